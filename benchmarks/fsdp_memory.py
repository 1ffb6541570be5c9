"""Per-process memory of one fine-tune: one process, two processes data parallel (DDP), two fully
sharded (``--fsdp``), side by side, with ``peftkit plan``'s prediction for each (issue 18).

Each is a real ``peftkit run`` (the last two under ``torchrun --nproc-per-node 2``, gloo on a CPU
machine) of the same full fine-tune, with the same global batch; the figure is the main process's
peak training memory as the run measures it (``peak_memory_bytes`` in metrics.json: on a CPU the
process's peak resident set). Each is run twice:

- with glibc's defaults: freed memory mostly stays in the process's heap, so a model loaded whole
  and then sharded keeps its pages, and the peak hides what sharding saves;
- with ``MALLOC_MMAP_THRESHOLD_=65536``: blocks of 64 KiB and more come from mmap and go back to
  the system when freed, so the peak is what the process holds at once.

    .venv/bin/python benchmarks/fsdp_memory.py                       # SmolLM2-135M, full fine-tune
    .venv/bin/python benchmarks/fsdp_memory.py --model minilm --task sequence-classification

Results: ``benchmarks/results/fsdp_memory_cpu.{json,md}`` (``--out PREFIX``), with the command, the
machine and the versions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

MODES = [("1 process", 1, []), ("2 processes, DDP", 2, []), ("2 processes, --fsdp", 2, ["--fsdp"])]
MALLOC = [("glibc defaults", {}), ("MALLOC_MMAP_THRESHOLD_=65536", {"MALLOC_MMAP_THRESHOLD_": "65536"})]


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--task", default="causal-lm")
    ap.add_argument("--strategy", default="full")
    ap.add_argument("--batch-size", type=int, default=8, help="global batch (default 8: 4 per process under two)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--max-train-samples", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "fsdp_memory_cpu"))
    args = ap.parse_args()
    from peftkit.env import machine_description, package_versions

    common = [
        "run",
        "--task",
        args.task,
        "--model",
        args.model,
        "--strategy",
        args.strategy,
        "--epochs",
        "1",
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--max-train-samples",
        str(args.max_train_samples),
        "--max-eval-samples",
        "4",
    ]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for malloc, env_extra in MALLOC:
            for name, procs, flags in MODES:
                out = os.path.join(work, f"{len(rows)}")
                launcher = (
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
                    if procs > 1
                    else [sys.executable]
                )
                env = dict(os.environ, PEFTKIT_DISABLE_PLUGINS="1", OMP_NUM_THREADS="1", **env_extra)
                print(f"{malloc}: {name} ...", file=sys.stderr, flush=True)
                proc = subprocess.run(
                    [*launcher, "-m", "peftkit", *common, *flags, "--output-dir", out],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                if proc.returncode != 0:
                    sys.exit(f"fsdp_memory: {name} failed:\n{proc.stderr[-2000:]}")
                with open(os.path.join(out, "metrics.json"), encoding="utf-8") as fh:
                    m = json.load(fh)
                rows.append(
                    {
                        "malloc": malloc,
                        "mode": name,
                        "processes": procs,
                        "fsdp": bool(flags),
                        "peak_training_bytes": m["peak_memory_bytes"],
                        "loaded_bytes": m["memory_loaded_bytes"],
                        "train_loss": m["history"][-1]["train_loss"],
                    }
                )
    plans = {}
    for name, procs, flags in MODES:
        extra = ["--processes", str(procs)] + (["--fsdp"] if flags else []) if procs > 1 else []
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "peftkit",
                "plan",
                "--task",
                args.task,
                "--model",
                args.model,
                "--strategies",
                args.strategy,
                "--batch-size",
                str(args.batch_size // procs),
                "--max-length",
                str(args.max_length),
                "--device",
                "cpu",
                "--json",
                *extra,
            ],
            capture_output=True,
            text=True,
            env=dict(os.environ, PEFTKIT_DISABLE_PLUGINS="1"),
        )
        plans[name] = json.loads(proc.stdout)["estimates"][0] if proc.returncode == 0 else None
    command = "python benchmarks/fsdp_memory.py" + "".join(f" {a}" for a in sys.argv[1:])
    lines = [
        f"# Per-process memory: {args.strategy} fine-tune of {args.model}, one process, DDP, --fsdp",
        "",
        f"Global batch {args.batch_size} x {args.max_length} tokens, {args.max_train_samples} training examples, "
        "1 epoch; the main process's peak training memory (`peak_memory_bytes`: on a CPU, the process's "
        "peak resident set).",
        "",
        "| malloc | run | peak training memory | vs 1 process | loaded model | plan: weights + gradients + "
        "optimizer + communication | plan: peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next(x for x in rows if x["malloc"] == r["malloc"] and x["processes"] == 1)["peak_training_bytes"]
        plan = plans.get(r["mode"])
        held = (
            None
            if plan is None
            else plan["weights"] + plan["gradients"] + plan["optimizer"] + plan.get("communication", 0)
        )
        lines.append(
            f"| {r['malloc']} | {r['mode']} | {_gib(r['peak_training_bytes'])} | "
            f"{r['peak_training_bytes'] / base:.2f}x | {_gib(r['loaded_bytes'])} | {_gib(held)} | "
            f"{_gib(None if plan is None else plan['total'])} |"
        )
    versions = package_versions()
    machine = machine_description()
    lines += [
        "",
        f"Command: `{command}`",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_bytes'] / 2**30:.0f} GiB",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out + ".json", "w", encoding="utf-8") as fh:
            json.dump(
                {
                    "command": command,
                    "rows": rows,
                    "plans": plans,
                    "machine": machine_description(),
                    "versions": versions,
                },
                fh,
                indent=2,
            )
        with open(args.out + ".md", "w", encoding="utf-8") as fh:
            fh.write(text)
        print(f"wrote {args.out}.json and {args.out}.md", file=sys.stderr)


if __name__ == "__main__":
    main()
