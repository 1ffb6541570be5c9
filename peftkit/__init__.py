"""peftkit: fine-tune pretrained models with interchangeable strategies.

    import peftkit

    result = peftkit.run(peftkit.RunConfig(strategy="lora", epochs=1, output_dir="runs/lora"))
    result.metrics.test["accuracy"], result.adapter_dir
    peftkit.predict(result.adapter_dir, ["A quietly devastating film."])

Importing peftkit is cheap (no torch); the heavy parts load when used. ``run``, ``bench``, ``plan``,
``predict``, ``merge``, ``inspect`` and ``resume`` are the commands' functions (``peftkit.api``),
with their settings ``RunConfig``, ``BenchConfig``, ``PlanSettings`` and ``Levers``;
``load_adapter`` / ``predict_texts`` / ``save_adapter`` work on adapters directly. Strategy and task
plugins subclass ``Strategy`` / ``Task`` and register with ``register_strategy`` / ``register_task``.

``peftkit.bench``, ``peftkit.plan`` and ``peftkit.predict`` are those functions even after the
modules of the same names are imported; the modules are ``from peftkit.plan import ...`` (or
``sys.modules["peftkit.plan"]``).
"""

from __future__ import annotations

import sys
import types
from typing import Any

__version__ = "0.1.0"

# name -> module it is read from, on first use (these import more, some of them torch)
_LAZY = {
    "run": "api", "bench": "api", "plan": "api", "predict": "api", "merge": "api", "inspect": "api",
    "resume": "api", "RunResult": "api",
    "RunConfig": "config", "Levers": "config", "BenchConfig": "bench", "PlanSettings": "plan",
    "load_adapter": "predict", "predict_texts": "predict", "save_adapter": "adapter_io",
}


class _Package(types.ModuleType):
    """The package, whose API functions ``bench``, ``plan`` and ``predict`` keep their names when
    the submodules of the same names are imported (the import system would rebind them)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and _LAZY[name] == "api" and isinstance(value, types.ModuleType):
            return  # the submodule stays reachable through sys.modules and `from peftkit.x import ...`
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

from .errors import PeftkitError  # noqa: E402 - after the class swap: these imports set attributes
from .registry import available as available_strategies  # noqa: E402
from .registry import get_strategy, register_strategy  # noqa: E402
from .strategies.base import ParamGroup, Strategy, TaskSpec, TrainingDefaults  # noqa: E402
from .tasks import Task, TaskData, register_task  # noqa: E402

__all__ = [
    "BenchConfig",
    "Levers",
    "ParamGroup",
    "PeftkitError",
    "PlanSettings",
    "RunConfig",
    "RunResult",
    "Strategy",
    "Task",
    "TaskData",
    "TaskSpec",
    "TrainingDefaults",
    "available_strategies",
    "bench",
    "get_strategy",
    "inspect",
    "load_adapter",
    "merge",
    "plan",
    "predict",
    "predict_texts",
    "register_strategy",
    "register_task",
    "resume",
    "run",
    "save_adapter",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # looked up once
        return value
    raise AttributeError(f"module 'peftkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
