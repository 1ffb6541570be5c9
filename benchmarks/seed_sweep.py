"""Accuracy of every strategy on the embedded default over several seeds, with their defaults.

Runs `peftkit run --strategy S --seed N` for each strategy and seed (each in its own process, so
one run's memory cannot leak into the next), keeps each run directory, and writes a table of mean
and spread. Runs whose directory already holds metrics.json are reused, so an interrupted sweep
continues where it stopped.

    .venv/bin/python benchmarks/seed_sweep.py --strategies full,head_only,lora --seeds 0,1,2

Output: benchmarks/results/seed_sweep_cpu.json and .md (the runs under runs/sweep/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", default="full,head_only,lora")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "sweep"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "seed_sweep_cpu"))
    ap.add_argument("extra", nargs="*", help="extra arguments passed to every `peftkit run`")
    args = ap.parse_args()
    strategies = [s for s in args.strategies.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    peftkit = os.path.join(os.path.dirname(sys.executable), "peftkit")

    rows = []
    todo = [(s, n) for s in strategies for n in seeds]
    for i, (strategy, seed) in enumerate(todo, 1):
        run_dir = os.path.join(args.runs_dir, f"{strategy}-seed{seed}")
        metrics_path = os.path.join(run_dir, "metrics.json")
        if not os.path.exists(metrics_path):
            print(f"[{i}/{len(todo)}] {strategy} seed {seed} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            done = subprocess.run(
                [peftkit, "run", "--strategy", strategy, "--seed", str(seed), "--output-dir", run_dir, *args.extra],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                print(f"  failed: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            m = json.load(open(metrics_path))
            m["command_wall_seconds"] = time.perf_counter() - start
            with open(metrics_path, "w") as fh:
                json.dump(m, fh, indent=2)
        else:
            print(f"[{i}/{len(todo)}] {strategy} seed {seed}: reusing {run_dir}", file=sys.stderr)
        rows.append(json.load(open(metrics_path)))

    summary = {}
    for strategy in strategies:
        mine = [r for r in rows if r["strategy"] == strategy]
        if not mine:
            continue
        acc = [r["test_accuracy"] for r in mine]
        summary[strategy] = {
            "seeds": [r["seed"] for r in mine],
            "test_accuracy_mean": statistics.mean(acc),
            "test_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "test_accuracy_min": min(acc),
            "test_accuracy_max": max(acc),
            "test_f1_macro_mean": statistics.mean(r["test_f1_macro"] for r in mine),
            "trainable_params": max(r["trainable_params"] for r in mine),
            "total_params": mine[0]["total_params"],
            "train_seconds_mean": statistics.mean(r["train_seconds"] for r in mine),
            "wall_seconds_mean": statistics.mean(r.get("command_wall_seconds", r["wall_seconds"]) for r in mine),
            "peak_memory_bytes_max": max(r["peak_memory_bytes"] for r in mine),
            "adapter_bytes": mine[0]["adapter_bytes"],
        }
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {rows[0]['device'] if rows else '?'}"
    )
    result = {
        "command": " ".join([os.path.relpath(sys.executable, ROOT), "benchmarks/seed_sweep.py", *sys.argv[1:]]),
        "machine": machine,
        "versions": rows[0]["versions"] if rows else {},
        "summary": summary,
        "runs": [
            {
                k: r[k]
                for k in ("strategy", "seed", "test_accuracy", "test_f1_macro", "validation_accuracy", "train_seconds")
            }
            for r in rows
        ],
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(result, fh, indent=2)
    lines = [
        f"Command: `{result['command']}`  ",
        f"Machine: {machine}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "",
        "| strategy | trainable params | test accuracy (mean ± sd, min-max) | macro-F1 | train time | wall | "
        "peak RSS | adapter |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s, v in summary.items():
        pct = 100 * v["trainable_params"] / v["total_params"]
        size = v["adapter_bytes"]
        size_text = f"{size / 2**20:.2f} MiB" if size >= 2**20 / 10 else f"{size / 2**10:.1f} KiB"
        lines.append(
            f"| `{s}` | {v['trainable_params']:,} ({pct:.3g}%) | {v['test_accuracy_mean']:.4f} ± "
            f"{v['test_accuracy_std']:.4f} "
            f"({v['test_accuracy_min']:.4f}-{v['test_accuracy_max']:.4f}, n={len(v['seeds'])}) | "
            f"{v['test_f1_macro_mean']:.4f} "
            f"| {v['train_seconds_mean']:.0f} s | {v['wall_seconds_mean']:.0f} s | "
            f"{v['peak_memory_bytes_max'] / 1e9:.2f} GB "
            f"| {size_text} |"
        )
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
