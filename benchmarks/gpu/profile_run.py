"""Where a training step's device time goes, per strategy: a few optimizer steps of each run under
``torch.profiler``, with the top kernels by device time and their share.

Every strategy ran at about a fifth of the card's bf16 peak on the first two H200 sessions
(head_only too, whose step is nearly all forward); this says which kernels take the time. Each run
is a real ``peftkit run`` (load, prepare, train, evaluate, save) in this one process, one after the
other; the profiler records only a window of ``--steps`` optimizer steps after ``--warmup`` (the
first steps pay for kernel selection and the loader's start), between two device synchronisations.
Part of the GPU suite (``suite.py``, case ``profile``), usable alone:

    python benchmarks/gpu/profile_run.py --model DIR --dataset FILE.jsonl --runs full,lora,head_only,lora+liger \\
        --out-dir profiles/

``--runs``: strategies, each optionally ``+KERNELS`` (``lora+liger``: ``--kernels liger``) or
``+plain`` (``--loss plain``). A run that is refused (Liger without CUDA or without the package) is
recorded with its one-line reason. Liger patches functions of transformers' modules for the whole
process, so a ``+liger`` run is moved after the others.

Writes ``profile.json`` (rewritten after each run: a run stopped by a time limit keeps the ones
before it) and ``profile_<run>.txt`` per run (kernels by device time; operators by own device time
and by own host time, over the window). Without CUDA (the suite's dry run) the "kernels" are the
CPU operators by own host time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

# kernel families, by name (first match wins; approximate: a kernel's name is all there is to go on)
CATEGORIES = (
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*(mha|attn)"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|wgmma|^sm\d+_|ampere_|hopper_|matmul|::mm$|::bmm|addmm|::linear$"),
    ("optimizer", r"multi_tensor|adam|foreach|fused_sgd"),
    ("loss / softmax", r"softmax|cross_entropy|nll_loss|logsumexp"),
    ("norm", r"norm|rms"),
    ("triton (Liger, compiled)", r"triton|liger|_kernel_\d|^kernel_"),
    ("copy / fill", r"memcpy|memset|copy|fill|cat_|CatArray"),
    (
        "elementwise / reduction",
        r"elementwise|vectorized|unrolled|reduce|index|gather|scatter|silu|mul|add|sub|div"
        r"|sqrt|exp|pow|lerp|where|mean|sum",
    ),
)


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def parse_run(spec: str) -> dict[str, Any]:
    """``lora+liger`` -> strategy lora, kernels liger; ``lora+plain`` -> loss plain."""
    strategy, *mods = spec.split("+")
    run: dict[str, Any] = {"name": spec, "strategy": strategy, "kernels": None, "loss": None}
    for m in mods:
        if m in ("torch", "liger", "none"):
            run["kernels"] = m
        elif m in ("plain", "chunked"):
            run["loss"] = m
        else:
            raise SystemExit(
                f"error: --runs: unknown modifier {m!r} in {spec!r} (kernels torch/liger/none, loss plain/chunked)"
            )
    return run


class Window:
    """Starts the profiler before optimizer step ``warmup`` (0-based) and stops it after ``steps``
    more, synchronising the device at both ends, by wrapping ``peftkit.loop.train_step``."""

    def __init__(self, prof: Any, warmup: int, steps: int, cuda: bool) -> None:
        self.prof, self.warmup, self.steps, self.cuda = prof, warmup, steps, cuda
        self.calls = 0
        self.started: float | None = None
        self.seconds: float | None = None
        self.profiled_steps = 0

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def before(self) -> None:
        if self.calls == self.warmup:
            self.sync()
            self.prof.start()
            self.started = time.perf_counter()

    def after(self) -> None:
        self.calls += 1
        if self.started is not None and self.seconds is None:
            self.profiled_steps += 1
            if self.profiled_steps == self.steps:
                self.stop()

    def stop(self) -> None:
        if self.started is not None and self.seconds is None:
            self.sync()
            self.seconds = time.perf_counter() - self.started
            self.prof.stop()


def kernel_table(averages: Any, cuda: bool, top: int) -> tuple[list[dict[str, Any]], float, dict[str, float]]:
    """The top ``top`` kernels by device time (CPU: operators by own host time), each with its
    share of the window's total; the total (seconds); the shares per kernel family."""
    from torch.autograd import DeviceType

    if cuda:
        rows = [
            (e.key, e.self_device_time_total, e.count)
            for e in averages
            if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0
        ]
    else:
        rows = [(e.key, e.self_cpu_time_total, e.count) for e in averages if e.self_cpu_time_total > 0]
    total = sum(r[1] for r in rows)
    rows.sort(key=lambda r: -r[1])
    families: dict[str, float] = {}
    for name, us, _ in rows:
        families[category(name)] = families.get(category(name), 0.0) + us / max(total, 1e-9)
    out = [
        {"name": name, "ms": us / 1000, "calls": count, "share": us / max(total, 1e-9), "family": category(name)}
        for name, us, count in rows[:top]
    ]
    return out, total / 1e6, dict(sorted(families.items(), key=lambda kv: -kv[1]))


def profile_one(run: dict[str, Any], args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    from peftkit import loop
    from peftkit.config import Levers, RunConfig
    from peftkit.train import execute_run, resolve

    steps = args.warmup + args.steps + 1  # one more: the window closes before the run's last step
    levers = Levers(precision=args.precision if cuda else "fp32", kernels=run["kernels"], loss=run["loss"])
    cfg = RunConfig(
        strategy=run["strategy"],
        task="causal-lm",
        model=args.model,
        dataset=args.dataset,
        epochs=1,
        batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        max_length=args.max_length,
        max_train_samples=steps * args.batch_size,
        max_eval_samples=args.batch_size,
        levers=levers,
        seed=0,
    )
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=activities)
    window = Window(prof, args.warmup, args.steps, cuda)
    original = loop.train_step

    def timed(*a: Any, **kw: Any) -> Any:
        window.before()
        try:
            return original(*a, **kw)
        finally:
            window.after()

    # where the loop's Trainer looks the step up (the module defining Trainer, since peftkit/loop is a package)
    sites = {loop, sys.modules[loop.Trainer.__module__]}
    for site in sites:
        site.train_step = timed
    started = time.perf_counter()
    try:
        cfg.validate()
        resolved = resolve(cfg)
        with tempfile.TemporaryDirectory() as workdir:
            metrics = execute_run(resolved, workdir, lambda message: print(message, flush=True))
    finally:
        for site in sites:
            site.train_step = original
        window.stop()
    wall = time.perf_counter() - started
    if window.seconds is None:
        raise RuntimeError(f"the run made {window.calls} steps, fewer than the {args.warmup} + {args.steps} profiled")
    averages = prof.key_averages()
    kernels, device_seconds, families = kernel_table(averages, cuda, args.top)
    result = {
        "name": run["name"],
        "strategy": run["strategy"],
        "kernels_lever": metrics.get("kernels"),
        "loss": metrics.get("loss"),
        "status": "ok",
        "profiled_steps": window.profiled_steps,
        "window_seconds": window.seconds,
        "device_seconds": device_seconds,
        "device_busy": device_seconds / window.seconds if cuda and window.seconds else None,
        "step_seconds_in_window": window.seconds / max(1, window.profiled_steps),
        "step_seconds_median": metrics.get("step_seconds_median"),
        "run_wall_seconds": wall,
        "peak_memory_bytes": metrics.get("peak_memory_bytes"),
        "measure": "CUDA kernels by device time" if cuda else "CPU operators by own host time (no CUDA)",
        "top": kernels,
        "families": families,
        "file": f"profile_{safe(run['name'])}.txt",
    }
    device_key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    with open(os.path.join(args.out_dir, result["file"]), "w", encoding="utf-8") as fh:
        fh.write(
            f"{run['name']}: {levers.precision}, {window.profiled_steps} optimizer steps of {args.batch_size} x "
            f"{args.max_length} tokens profiled after {args.warmup}; window {window.seconds * 1000:.1f} ms, "
            f"{result['measure']} {device_seconds * 1000:.1f} ms"
            + (f" (device busy {result['device_busy']:.0%})" if result["device_busy"] is not None else "")
            + f"; the run: {wall:.1f} s, step median {metrics.get('step_seconds_median') or 0:.4f} s\n\n"
        )
        fh.write(f"== top {args.top}: {result['measure']} ==\n")
        for k in kernels:
            fh.write(f"{k['share']:7.1%} {k['ms']:10.2f} ms {k['calls']:6d} x  [{k['family']}] {k['name']}\n")
        fh.write("\n== by kernel family (by name, approximate) ==\n")
        for name, share in families.items():
            fh.write(f"{share:7.1%}  {name}\n")
        fh.write(f"\n== operators by own device time ({device_key}) ==\n")
        fh.write(averages.table(sort_by=device_key, row_limit=args.rows) + "\n")
        fh.write("== operators by own host time ==\n")
        fh.write(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows) + "\n")
    del prof, averages
    return result


def safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument(
        "--runs",
        default="full,lora,head_only,lora+liger",
        help="strategies, each optionally +KERNELS or +plain (default: full,lora,head_only,lora+liger)",
    )
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps profiled per run (default 3)")
    ap.add_argument("--warmup", type=int, default=2, help="optimizer steps before the window (default 2)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--top", type=int, default=10, help="kernels listed per run (default 10)")
    ap.add_argument("--rows", type=int, default=25, help="operators in each table of the text files")
    ap.add_argument("--out-dir", required=True, help="folder for profile.json and profile_<run>.txt")
    args = ap.parse_args()

    import torch

    from peftkit.env import quiet_libraries

    quiet_libraries()  # as a run's own process does: no "Loading weights" bar in the suite's log
    cuda = torch.cuda.is_available()
    os.makedirs(args.out_dir, exist_ok=True)
    runs = [parse_run(s.strip()) for s in args.runs.split(",") if s.strip()]
    runs.sort(key=lambda r: r["kernels"] == "liger")  # Liger patches transformers' modules for the process
    record: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "steps": args.steps,
        "warmup": args.warmup,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "precision": args.precision if cuda else "fp32",
        "runs": {},
    }
    path = os.path.join(args.out_dir, "profile.json")
    for run in runs:
        print(f"[profile] {run['name']} ...", flush=True)
        try:
            result = profile_one(run, args, cuda)
        except Exception as exc:  # noqa: BLE001 - a refused or failed run is a line of the report
            text = str(exc).strip().splitlines()
            result = {
                "name": run["name"],
                "strategy": run["strategy"],
                "status": "refused",
                "error": f"{type(exc).__name__}: {text[0] if text else ''}",
            }
        record["runs"][run["name"]] = result
        print(
            f"[profile] {run['name']}: "
            + (
                f"{result['measure']}, top: "
                + "; ".join(f"{k['share']:.0%} {k['name'][:60]}" for k in result["top"][:3])
                if result["status"] == "ok"
                else result["error"]
            ),
            flush=True,
        )
        with open(path + ".tmp", "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=1)
        os.replace(path + ".tmp", path)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    print(f"profiles: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
