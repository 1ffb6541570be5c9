"""``torch.compile`` deferred to a function's first call while bitsandbytes is imported: a second
off every command that imports peft, without changing what any function computes.

peft imports bitsandbytes wherever it is installed (``peft.helpers``), quantized run or not, and
bitsandbytes wraps a few of its CPU kernels in ``torch.compile`` as its modules load
(``backends/default/ops.py``). That call compiles nothing yet (torch compiles on the first call),
but it imports TorchDynamo's and Inductor's compiler front end: 0.85-0.95 s of a 4.7 s ``import
torch, peft`` on a 2-core EPYC (three fresh processes each way), about a seventh of a run's start-up
(issue 30). While bitsandbytes' modules execute, ``torch.compile`` is here a function that calls the
real one on the wrapped function's first call, so that cost is paid only by a run that uses those
kernels (a quantized CPU run), at the moment torch would have compiled anyway. Anything else handed
to ``torch.compile`` in that window (a module, a compile without a function) gets the real call.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

# the libraries whose import runs with torch.compile deferred
DEFERRED = ("bitsandbytes",)


def compile_on_first_call(real: Callable[..., Any]) -> Callable[..., Any]:
    """A stand-in for ``torch.compile`` (``real``): for a plain function, a wrapper that compiles
    it with ``real`` and the same arguments on its first call and then calls the compiled one;
    anything else goes to ``real`` at once."""

    def deferred(model: Any = None, **kwargs: Any) -> Any:
        if model is None:  # used as @torch.compile(...): the function comes next
            return lambda fn: deferred(fn, **kwargs)
        if not inspect.isfunction(model):
            return real(model, **kwargs)
        compiled: list[Callable[..., Any]] = []

        def first_call_compiles(*args: Any, **kw: Any) -> Any:
            if not compiled:
                compiled.append(real(model, **kwargs))
            return compiled[0](*args, **kw)

        first_call_compiles.__wrapped__ = model  # type: ignore[attr-defined]
        return first_call_compiles

    return deferred


class _DeferringLoader(importlib.abc.Loader):
    """The library's own loader, its module executed with ``torch.compile`` deferred."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        import torch

        real = torch.compile
        torch.compile = compile_on_first_call(real)  # type: ignore[assignment]
        try:
            self.loader.exec_module(module)  # (its submodules load inside this call)
        finally:
            torch.compile = real


class _DeferringFinder(importlib.abc.MetaPathFinder):
    """Finds the ``DEFERRED`` libraries as the other finders do, and hands their top module a
    ``_DeferringLoader``; every other import passes by untouched."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in DEFERRED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _DeferringLoader(spec.loader)
        return spec


def defer_compile_while_importing() -> None:
    """From now on in this process, import the ``DEFERRED`` libraries with ``torch.compile``
    deferred (``compile_on_first_call``); no-op where one is imported already or this was done.
    Imports nothing. Only peftkit's own processes call it (``env.own_process``)."""
    if any(isinstance(f, _DeferringFinder) for f in sys.meta_path):
        return
    if any(name in sys.modules for name in DEFERRED):
        return
    sys.meta_path.insert(0, _DeferringFinder())
