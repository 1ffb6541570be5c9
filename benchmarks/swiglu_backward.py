"""What `--kernels torch`'s SwiGLU costs against autograd's, per MLP block (forward + backward).

peftkit's ``swiglu`` keeps only ``gate`` and ``up`` for the backward pass (a third less of the MLP's
saved activations) and so computes ``silu(gate)`` again there. Its backward was first written out
element by element (six passes over a batch x length x intermediate tensor); it is now aten's fused
``silu_backward``. This times the three side by side, interleaved, in one process, at SmolLM2-135M's
MLP shape (8 x 512 tokens x 1,536) in fp32:

    .venv/bin/python benchmarks/swiglu_backward.py                 # prints, and writes results/swiglu_<device>.json
    .venv/bin/python benchmarks/swiglu_backward.py --rounds 30 --shape 8,1024,1536
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8,512,1536", help="batch,length,intermediate (default SmolLM2's at 8 x 512)")
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds, each running every variant once")
    ap.add_argument("--out", default=None, help="result file (default results/swiglu_<device>.json; '' for none)")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from peftkit.env import machine_description
    from peftkit.kernels import swiglu

    class WrittenOut(torch.autograd.Function):
        """The first version of peftkit's backward: the derivative written out in torch."""

        @staticmethod
        def forward(ctx: Any, gate: Any, up: Any) -> Any:
            ctx.save_for_backward(gate, up)
            return F.silu(gate) * up

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            gate, up = ctx.saved_tensors
            sig = torch.sigmoid(gate)
            return grad * up * sig * (1 + gate * (1 - sig)), grad * (gate * sig)

    variants = {
        "autograd": lambda g, u: F.silu(g) * u,
        "peftkit (aten silu_backward)": swiglu,
        "written out (before)": WrittenOut.apply,
    }
    shape = tuple(int(x) for x in args.shape.split(","))
    gate = torch.randn(shape, requires_grad=True)
    up = torch.randn(shape, requires_grad=True)
    grad_out = torch.randn(shape)
    reference = None
    for name, fn in variants.items():  # warm-up, and the same gradients from each
        gate.grad = up.grad = None
        fn(gate, up).backward(grad_out)
        grads = (gate.grad.clone(), up.grad.clone())
        if reference is None:
            reference = grads
        for mine, ref in zip(grads, reference):
            torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            gate.grad = up.grad = None
            start = time.perf_counter()
            fn(gate, up).backward(grad_out)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["autograd"])
    out = {
        "command": " ".join(["benchmarks/swiglu_backward.py", *sys.argv[1:]]),
        "machine": machine_description(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "threads": torch.get_num_threads(),
        "shape": shape,
        "rounds": args.rounds,
        "median_ms": {name: 1000 * statistics.median(v) for name, v in times.items()},
        "x_autograd": {name: statistics.median(v) / base for name, v in times.items()},
    }
    m = out["machine"]
    print(f"{m['cpu']}, {m['cores']} cores; torch {torch.__version__}, {out['threads']} threads", end="; ")
    print(f"shape {shape}, {args.rounds} rounds")
    for name in variants:
        print(f"  {name:30s} {out['median_ms'][name]:7.1f} ms  {out['x_autograd'][name]:.2f}x autograd")
    path = args.out if args.out is not None else os.path.join(HERE, "results", "swiglu_cpu.json")
    if path:
        with open(path, "w") as fh:
            json.dump(out, fh, indent=2)
        print(f"results: {path}")


if __name__ == "__main__":
    main()
