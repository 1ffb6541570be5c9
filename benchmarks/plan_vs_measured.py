"""`peftkit plan`'s prediction against the peak a real run measured, row by row (issue 30, item 4).

Reads a result file of ``vs_trainer.py`` (default ``results/vs_trainer_cpu.json``), whose peftkit rows
each measured a run's peak memory in fresh processes (CPU: the resident set; CUDA: the allocator's
peak), and plans every such row with ``peftkit plan`` in a fresh process of its own, given what the
run trained: the model, task and strategy options (LoRA's r, alpha and target modules, dropout 0 as
the benchmark sets it), the row's levers (``--loss plain``, ``--kernels none``, ``--packing``), and the
batch as the run saw it: its rows and their padded width (read from the positions of its steps: job
b's batches of pairs are padded to their longest, 312 tokens, not 512), and the positions the loss is
on (plain text: every one; pairs: the longest answer). The planned peak over the measured one is the
row's ratio; issue 30 asks for each within +-15%.

Memory does not drift with the machine's load as step time does, so the plan need not run beside the
measurement; the record keeps the measurement's machine and versions beside this run's.

    .venv/bin/python benchmarks/plan_vs_measured.py        # results/plan_vs_measured_cpu.json
    .venv/bin/python benchmarks/plan_vs_measured.py --measured results/vs_trainer_cuda.json --out ''
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from vs_trainer import record_head, write_record  # noqa: E402  (benchmarks/ is not a package)

TOLERANCE = 0.15


def plan_arguments(settings: dict[str, Any], row: dict[str, Any], device: str) -> list[str]:
    """The ``peftkit plan`` arguments for one measured peftkit row of a vs_trainer job: the run's
    model, task, LoRA options, levers, and batch as its steps saw it (rows x padded width)."""
    run = row["runs"][0]
    positions = max(run.get("positions_per_step") or [0])
    rows = int(run.get("batch_examples") or settings["batch_size"])
    packing = "--packing" in row["flags"]
    if packing:  # rows of --max-length holding several examples each
        width = int(settings["max_length"])
        rows = max(1, math.ceil(positions / width))
    else:
        width = positions // rows if positions else int(settings["max_length"])
    args = ["plan", "--model", settings["model"], "--task", settings["task"], "--strategies", "lora"]
    args += ["--batch-size", str(rows), "--max-length", str(width), "--device", device, "--json"]
    lora = settings.get("lora") or {}
    for key in ("r", "alpha", "dropout"):
        if lora.get(key) is not None:
            args += ["--set", f"{key}={lora[key]}"]
    if lora.get("target_modules"):
        args += ["--set", "target_modules=[" + ",".join(lora["target_modules"]) + "]"]
    if settings.get("precision") and settings["precision"] != "fp32":
        args += ["--precision", settings["precision"]]
    if settings["task"] == "causal-lm" and not packing:
        answers = (settings.get("response_tokens") or {}).get("max")
        args += ["--loss-tokens", str(min(width, answers) if answers else width)]  # plain text: every token
    return args + list(row["flags"])


def planned_peak(args: list[str], timeout: float) -> tuple[int | None, str | None, float]:
    """(planned peak bytes, error, seconds) of ``peftkit plan`` run with ``args`` in a fresh process."""
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "peftkit", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s", time.perf_counter() - started
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return None, lines[-1] if lines else f"exit status {done.returncode}", seconds
    estimate = json.loads(done.stdout)["estimates"][0]
    if estimate["status"] != "ok":
        return None, f"{estimate['status']}: {estimate['error']}", seconds
    return int(estimate["total"]), None, seconds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--measured",
        default=os.path.join(HERE, "results", "vs_trainer_cpu.json"),
        help="a vs_trainer.py result file (default: results/vs_trainer_cpu.json)",
    )
    ap.add_argument("--jobs", default="a,b,c", help="which of its jobs, comma-separated (default a,b,c)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds one plan may take")
    ap.add_argument("--out", default=None, help="result file (default: results/plan_vs_measured_<device>.json)")
    args = ap.parse_args(argv)
    try:
        with open(args.measured, encoding="utf-8") as fh:
            measured = json.load(fh)
    except (OSError, ValueError) as exc:
        ap.error(f"--measured {args.measured!r}: cannot read a vs_trainer.py result ({exc})")
    jobs = measured.get("jobs") or {}
    keys = [k.strip() for k in args.jobs.split(",") if k.strip()]
    unknown = [k for k in keys if k not in jobs]
    if unknown or not keys:
        ap.error(f"--jobs: {', '.join(unknown) or '(none)'} not in {args.measured} (it has {', '.join(jobs)})")
    device = "cuda" if str(measured.get("device", "cpu")).startswith("cuda") else "cpu"
    out = args.out if args.out is not None else os.path.join(HERE, "results", f"plan_vs_measured_{device}.json")
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for key in keys:
        settings = jobs[key]["settings"]
        if settings.get("epochs"):  # an epoch of batches of many shapes: no one batch to plan
            continue
        for row in jobs[key]["rows"]:
            if row["side"] != "peftkit" or row.get("status") != "ok":
                continue
            plan_args = plan_arguments(settings, row, device)
            peak, error, seconds = planned_peak(plan_args, args.timeout)
            got = row["summary"]["peak_train_bytes"]
            ratio = peak / got if peak and got else None
            rows.append(
                {
                    "job": key,
                    "row": row["label"],
                    "command": "peftkit " + " ".join(plan_args),
                    "planned_bytes": peak,
                    "measured_bytes": got,
                    "ratio": ratio,
                    "within": None if ratio is None else abs(ratio - 1) <= TOLERANCE,
                    "error": error,
                    "plan_seconds": round(seconds, 1),
                }
            )
            shown = f"{ratio:.3f}" if ratio else error
            print(f"[{key}] {row['label']}: planned {_gib(peak)} measured {_gib(got)}: {shown}", file=sys.stderr)
    within = [r for r in rows if r["within"]]
    summary = f"within +-{TOLERANCE:.0%}: {len(within)} of {len(rows)} rows"
    print(f"{'job':<4}{'row':<26}{'planned':>10}{'measured':>10}{'ratio':>8}")
    for r in rows:
        ratio = f"{r['ratio']:.3f}" if r["ratio"] else "-"
        print(f"{r['job']:<4}{r['row']:<26}{_gib(r['planned_bytes']):>10}{_gib(r['measured_bytes']):>10}{ratio:>8}")
    print(summary)
    if out:
        record = {
            **record_head("plan_vs_measured.py", argv, device, started),
            "measured_file": os.path.relpath(os.path.abspath(args.measured), HERE),
            "measured_command": measured.get("command"),
            "measured_machine": measured.get("machine"),
            "measured_versions": measured.get("versions"),
            "tolerance": TOLERANCE,
            "rows": rows,
            "summary": summary,
        }
        write_record(out, record)


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


if __name__ == "__main__":
    main()
