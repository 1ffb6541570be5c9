"""peftkit's own processes import bitsandbytes with torch.compile deferred to each function's first
call (``peftkit.deferred_compile``): importing peft then loads no Inductor, and what bitsandbytes
computes, and how torch.compile is called, are unchanged."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from peftkit.deferred_compile import compile_on_first_call


def test_the_real_compile_runs_on_the_first_call_with_the_same_arguments() -> None:
    calls = []

    def real(model, **kwargs):
        calls.append((model, kwargs))
        return lambda *args, **kw: ("compiled", model(*args, **kw))

    deferred = compile_on_first_call(real)

    def double(x):
        return 2 * x

    wrapped = deferred(double, dynamic=False)
    assert calls == [] and wrapped.__wrapped__ is double  # nothing compiled yet
    assert wrapped(3) == ("compiled", 6) and wrapped(4) == ("compiled", 8)
    assert calls == [(double, {"dynamic": False})]  # once, as torch.compile(double, dynamic=False)
    decorated = deferred(fullgraph=True)(double)  # the @torch.compile(...) form
    assert decorated(1) == ("compiled", 2) and calls[-1] == (double, {"fullgraph": True})
    module = object()
    assert deferred(module) is not None and calls[-1] == (module, {})  # not a function: at once


@pytest.mark.skipif(__import__("importlib").util.find_spec("bitsandbytes") is None, reason="bitsandbytes")
def test_peftkits_own_process_imports_peft_without_inductor_and_bitsandbytes_still_computes() -> None:
    code = (
        "import sys\n"
        "from peftkit.env import own_process\nown_process()\n"
        "import peft, torch, bitsandbytes.functional as F\n"
        "assert torch.compile.__module__.startswith('torch'), 'torch.compile restored'\n"
        "print('inductor', 'torch._inductor.compile_fx' in sys.modules)\n"
        "w = torch.randn(64, 64)\n"
        "q, state = F.quantize_4bit(w, blocksize=64, quant_type='nf4')\n"
        "err = (F.dequantize_4bit(q, state) - w).abs().max().item()\n"
        "print('error', err)\n"
    )
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert lines["inductor"] == "False"
    assert 0 < float(lines["error"]) < 0.5  # NF4 rounds a normal weight to within a few tenths
