"""Where a run's time goes: one whole ``peftkit run`` (load, prepare, train, evaluate, save) under
``torch.profiler``, written as two tables: operators by their own device time, and by their own
host time.

The first H200 run found every strategy at about a fifth of the card's bf16 peak (head_only too,
whose step is nearly all forward) and 30-65 s of wall time per run for 2-6 s of training; this is
the measurement that says why. Part of the GPU suite (``suite.py --cases profile``), usable alone:

    python benchmarks/gpu/profile_run.py --model DIR --dataset FILE.jsonl --strategy full --out profile.txt
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--strategy", default="full")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps profiled")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out", required=True, help="text file for the tables")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from peftkit.config import Levers, RunConfig
    from peftkit.env import quiet_libraries
    from peftkit.train import execute_run, resolve

    cfg = RunConfig(strategy=args.strategy, task="causal-lm", model=args.model, dataset=args.dataset, epochs=1,
                    batch_size=args.batch_size, eval_batch_size=args.batch_size, max_length=args.max_length,
                    max_train_samples=args.steps * args.batch_size, max_eval_samples=args.batch_size,
                    levers=Levers(precision=args.precision if torch.cuda.is_available() else "fp32"), seed=0)
    cfg.validate()
    run = resolve(cfg)
    quiet_libraries()  # as a run's own process does: no "Loading weights" bar in the suite's log
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir, profile(activities=activities) as prof:
        metrics = execute_run(run, workdir, lambda message: print(message, flush=True))
    wall = time.perf_counter() - start
    averages = prof.key_averages()
    device_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    with open(args.out, "w", encoding="utf-8") as fh:
        fh.write(f"{args.strategy}, {cfg.levers.precision}, {args.steps} steps of {args.batch_size} x {args.max_length} "
                 f"tokens; wall {wall:.1f} s (under the profiler), train {metrics['train_seconds']:.2f} s, "
                 f"step {metrics.get('step_seconds_median') or 0:.4f} s\n\n")
        fh.write(f"== by own device time ({device_key}) ==\n")
        fh.write(averages.table(sort_by=device_key, row_limit=args.rows) + "\n")
        fh.write("== by own host time ==\n")
        fh.write(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows) + "\n")
    print(f"profile of {args.strategy}: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
