"""What each memory lever costs and saves: the same small suite under each lever setting.

Runs `peftkit bench --strategies lora,full --max-train-samples 2000 --epochs 1 <lever flags>
--output-dir runs/levers-<name>` for each setting below (a suite whose results.json exists is reused,
so an interrupted sweep continues), then writes one table of accuracy, peak training memory (with
the planner's prediction), time and throughput per strategy and setting.

    .venv/bin/python benchmarks/levers.py

Output: benchmarks/results/levers_cpu.{json,md}. On a GPU machine pass --out and --strategies, e.g.
`--model /tmp/llama-0.6b --out benchmarks/results/levers_gpu` (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SETTINGS = [
    ("fp32", []),
    ("bf16", ["--precision", "bf16"]),
    ("4bit base", ["--quantize", "4bit"]),
    ("8bit base", ["--quantize", "8bit"]),
    ("4bit base + bf16", ["--quantize", "4bit", "--precision", "bf16"]),
    ("8-bit AdamW", ["--optimizer", "adamw8bit"]),
    ("gradient checkpointing", ["--gradient-checkpointing"]),
]
DIRS = {
    "fp32": "fp32",
    "bf16": "bf16",
    "4bit base": "q4",
    "8bit base": "q8",
    "4bit base + bf16": "q4bf16",
    "8-bit AdamW": "a8",
    "gradient checkpointing": "gc",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", default="lora,full")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--max-train-samples", default="2000")
    ap.add_argument("--runs-dir", default=os.path.join(ROOT, "runs"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "levers_cpu"))
    args = ap.parse_args()
    peftkit = os.path.join(os.path.dirname(sys.executable), "peftkit")
    suites = {}
    for name, flags in SETTINGS:
        out = os.path.join(args.runs_dir, f"levers-{DIRS[name]}")
        if not os.path.exists(os.path.join(out, "results.json")):
            print(f"{name}: running", file=sys.stderr, flush=True)
            subprocess.run(
                [
                    peftkit,
                    "bench",
                    "--strategies",
                    args.strategies,
                    "--model",
                    args.model,
                    "--max-train-samples",
                    args.max_train_samples,
                    "--epochs",
                    "1",
                    *flags,
                    "--output-dir",
                    out,
                ],
                check=False,
            )
        if os.path.exists(os.path.join(out, "results.json")):
            with open(os.path.join(out, "results.json"), encoding="utf-8") as fh:
                suites[name] = json.load(fh)
    first = next(iter(suites.values()))
    lines = [
        "Made by `.venv/bin/python benchmarks/levers.py`: one `peftkit bench` per setting (commands below).",
        f"Machine: {first['machine']['cpu']}, {first['machine']['cores']} cores; device: {first['device']}",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in first["versions"].items()),
        "",
        "| setting | strategy | test accuracy | peak train memory | predicted (error) | over loaded model "
        "| train time | examples/s | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    table = []
    for name, suite in suites.items():
        for strategy, v in suite["summary"].items():
            if v.get("test_accuracy_mean") is None:
                lines.append(f"| {name} | `{strategy}` | | | | | | | {v['status']}: {v.get('error', '')} |")
                continue
            err = v.get("prediction_error")
            pred = f"{v['predicted_peak_bytes'] / 2**30:.2f} GiB ({err:+.0%})" if err is not None else "-"
            lines.append(
                f"| {name} | `{strategy}` | {v['test_accuracy_mean']:.4f} | {v['peak_memory_bytes'] / 2**30:.2f} GiB "
                f"| {pred} | +{v['peak_memory_increase_bytes'] / 2**20:.0f} MiB | {v['train_seconds_mean']:.1f} s "
                f"| {v['samples_per_second_mean']:.0f} | ok |"
            )
            table.append(
                {
                    "setting": name,
                    "strategy": strategy,
                    **{
                        k: v.get(k)
                        for k in (
                            "test_accuracy_mean",
                            "peak_memory_bytes",
                            "predicted_peak_bytes",
                            "prediction_error",
                            "peak_memory_increase_bytes",
                            "train_seconds_mean",
                            "samples_per_second_mean",
                            "tokens_per_second_mean",
                        )
                    },
                }
            )
    lines += ["", "Commands:", ""] + [f"- {n}: `{s['command']}`" for n, s in suites.items()]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w", encoding="utf-8") as fh:
        json.dump(
            {
                "machine": first["machine"],
                "device": first["device"],
                "versions": first["versions"],
                "commands": {n: s["command"] for n, s in suites.items()},
                "rows": table,
            },
            fh,
            indent=2,
        )
    with open(args.out + ".md", "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
