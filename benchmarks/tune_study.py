"""Does tuning pay? `peftkit tune` per strategy on a training subset, then default and best trained on
the whole training set and compared on the same test examples.

For each strategy this runs, through the CLI (so every step is a command a user can repeat):

1. ``peftkit tune --strategy S --trials N --max-train-samples M --output-dir RUNS/S-tune``: trial 0 is
   the defaults, selection on validation only. An interrupted script continues each study when run
   again (the study is in ``RUNS/S-tune/study.db``).
2. ``peftkit run --strategy S`` (the defaults) and ``peftkit run --config best-full.yaml`` (the best
   trial's settings, ``best.yaml`` with the subset limit removed), both on the whole training set.
3. The two runs' test accuracies, and a paired test of the two on the same test examples
   (bootstrap + exact McNemar, the bench's; ``peftkit/stats.py``).

Results: ``benchmarks/results/tune_cpu.{json,md}`` (command, machine, CPU, versions in both).

    .venv/bin/python benchmarks/tune_study.py --strategies prefix,lora,adapter --trials 12 --max-train-samples 2000
    .venv/bin/python benchmarks/tune_study.py --report   # the report again from what was measured
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from peftkit.env import machine_description, package_versions  # noqa: E402
from peftkit.files import write_json  # noqa: E402
from peftkit.stats import from_bits, paired_bootstrap  # noqa: E402

PEFTKIT = os.path.join(os.path.dirname(sys.executable), "peftkit")


def call(args: list[str], log: str) -> float:
    """Run a peftkit command, its output to ``log`` (and its last lines to the console on failure)."""
    print("$ peftkit " + " ".join(args), flush=True)
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as fh:
        code = subprocess.call([PEFTKIT, *args], stdout=fh, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if code != 0:
        with open(log, encoding="utf-8") as fh:
            tail = fh.readlines()[-15:]
        sys.exit(f"peftkit {' '.join(args)} failed (exit {code}); end of {log}:\n{''.join(tail)}")
    return seconds


def read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def full_set_config(best_yaml: str, target: str) -> None:
    """best.yaml without the subset limit: the best settings trained on the whole training set."""
    with open(best_yaml, encoding="utf-8") as fh:
        values = yaml.safe_load(fh)
    values["max_train_samples"] = None
    with open(target, "w", encoding="utf-8") as fh:
        fh.write(f"# {os.path.relpath(best_yaml, ROOT)} with max_train_samples removed (tune_study.py)\n")
        yaml.safe_dump(values, fh, sort_keys=False)


def study_one(strategy: str, args: argparse.Namespace, log: str) -> dict[str, Any]:
    """Tune one strategy on the subset, then train default and best on the whole training set."""
    tune_dir = os.path.join(args.runs, f"{strategy}-tune")
    tune_args = [
        "tune",
        "--strategy",
        strategy,
        "--trials",
        str(args.trials),
        "--seed",
        str(args.seed),
        "--max-train-samples",
        str(args.max_train_samples),
        "--output-dir",
        tune_dir,
    ]
    tune_seconds = None
    if not os.path.exists(os.path.join(tune_dir, "trials.json")):
        tune_seconds = call(tune_args, log)
    trials = read_json(os.path.join(tune_dir, "trials.json"))
    rows = trials["rows"]
    # The defaults trial is queued again when its first attempt was interrupted: take the one that finished.
    default_row = next(r for r in rows if r["defaults"] and r["state"] == "complete")
    states: dict[str, int] = {}
    for r in rows:
        states[r["state"]] = states.get(r["state"], 0) + 1

    best_full = os.path.join(args.runs, f"{strategy}-best-full.yaml")
    full_set_config(os.path.join(tune_dir, "best.yaml"), best_full)
    same = trials["best_trial"] == default_row["number"]
    runs = {
        "default": ["run", "--strategy", strategy, "--seed", str(args.seed)],
        "tuned": ["run", "--config", best_full],
    }
    if same:  # the defaults won the study: the tuned run would be the default run again
        del runs["tuned"]
    measured: dict[str, Any] = {}
    for name, run_args in runs.items():
        run_dir = os.path.join(args.runs, f"{strategy}-{name}-full")
        seconds = None
        if not os.path.exists(os.path.join(run_dir, "metrics.json")):
            seconds = call([*run_args, "--output-dir", run_dir], log)
        metrics = read_json(os.path.join(run_dir, "metrics.json"))
        measured[name] = {
            "command": "peftkit " + " ".join([*run_args, "--output-dir", run_dir]),
            "test_accuracy": metrics["test_accuracy"],
            "validation_accuracy": metrics.get("validation_accuracy"),
            "train_seconds": metrics.get("train_seconds"),
            "wall_seconds": seconds,
            "correct": metrics.get("per_example_correct"),
        }
    if same:
        measured["tuned"] = measured["default"]
    comparison = None
    if not same and measured["default"]["correct"] and measured["tuned"]["correct"]:
        c = paired_bootstrap([from_bits(measured["tuned"]["correct"])], [from_bits(measured["default"]["correct"])])
        comparison = {
            "difference": c.difference,
            "low": c.low,
            "high": c.high,
            "p": c.p_value,
            "bootstrap_p": c.bootstrap_p,
            "mcnemar_p": c.mcnemar_p,
            "examples": c.examples,
            "distinguishable": c.distinguishable(),
        }
    for m in measured.values():
        m.pop("correct", None)
    return {
        "tune_command": "peftkit " + " ".join(tune_args),
        "tune_seconds": tune_seconds,
        "trials": len(rows),
        "states": states,
        "default_validation": default_row["value"],
        "best_validation": trials["best_value"],
        "best_trial": trials["best_trial"],
        "best_params": trials["best_params"],
        "defaults_won": same,
        # the best trial against the defaults on the same validation examples (peftkit tune's own test)
        "validation_versus_defaults": trials.get("versus_defaults"),
        "subset_test_accuracy_of_best": ((trials.get("best_run") or {}).get("test") or {}).get("accuracy"),
        "full_training_set": measured,
        "tuned_vs_default": comparison,
    }


def report(results: dict[str, Any]) -> str:
    """The markdown table."""
    lines = [
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
        f"{results['machine']['platform']}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
        "",
        f"Each strategy: `peftkit tune`, {results['trials']} trials on a {results['max_train_samples']:,}-example "
        "training subset (seeded; trial 0 = the defaults; TPE, median pruner; selection on validation), "
        "then the defaults and the best trial's settings each trained once on the whole training set "
        f"(seed {results['seed']}) and evaluated on the same test examples.",
        "",
        "Beside the validation figures, where the study recorded which validation examples each trial got "
        "right: the best trial against the defaults on those examples (paired, as peftkit tune reports it). "
        "Studies run before peftkit recorded it have none.",
        "",
        "| strategy | trials (complete / pruned / failed) | validation: default → best (subset) | "
        "test, whole training set: default | tuned | tuned − default (95% interval), p | tune time | best settings |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["strategies"].items():
        st = r["states"]
        full = r["full_training_set"]
        c = r["tuned_vs_default"]
        diff = (
            "the same settings"
            if r["defaults_won"]
            else (
                f"{100 * c['difference']:+.1f} pts ({100 * c['low']:+.1f}, {100 * c['high']:+.1f}), p={c['p']:.2g}"
                + ("" if c["distinguishable"] else ", not distinguishable")
                if c
                else "-"
            )
        )
        settings = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["best_params"].items()
        )
        tune_time = f"{r['tune_seconds'] / 60:.1f} min" if r["tune_seconds"] else "(earlier)"
        v = r.get("validation_versus_defaults")
        sure = (
            (
                f", {100 * v['difference']:+.1f} pts ({100 * v['low']:+.1f}, {100 * v['high']:+.1f}), "
                f"p={v['p_value']:.2g}" + ("" if v["distinguishable"] else ", not distinguishable")
            )
            if v
            else ""
        )
        # trials.json's "fail" became "failed" and "interrupted" (told apart): the column keeps its meaning
        failed = st.get("fail", 0) + st.get("failed", 0) + st.get("interrupted", 0)
        lines.append(
            f"| `{name}` | {r['trials']} ({st.get('complete', 0)} / {st.get('pruned', 0)} / {failed}) "
            f"| {r['default_validation']:.4f} → {r['best_validation']:.4f} (#{r['best_trial']}{sure}) "
            f"| {full['default']['test_accuracy']:.4f} | {full['tuned']['test_accuracy']:.4f} | {diff} "
            f"| {tune_time} | {settings or 'defaults'} |"
        )
    lines.append("")
    lines.append(
        f"Total wall time: {results['total_minutes']:.1f} min"
        + ("." if results.get("finished", True) else " so far (not every strategy asked for has run yet).")
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default="lora,adapter,prefix")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--max-train-samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--runs",
        default=os.path.join("runs", "tune-study"),
        help="Where studies and runs go (relative: to the current directory).",
    )
    parser.add_argument("--out", default=os.path.join(HERE, "results", "tune_cpu"), help="Results path without suffix.")
    parser.add_argument(
        "--report",
        action="store_true",
        help="Only write the report again from the results JSON (and each study's trials.json).",
    )
    args = parser.parse_args()
    if args.report:
        results = read_json(args.out + ".json")
        for name, r in results["strategies"].items():
            r["validation_versus_defaults"] = read_json(os.path.join(args.runs, f"{name}-tune", "trials.json")).get(
                "versus_defaults"
            )
        write_json(args.out + ".json", results)
        with open(args.out + ".md.tmp", "w", encoding="utf-8") as fh:
            fh.write(report(results))
        os.replace(args.out + ".md.tmp", args.out + ".md")
        print(report(results))
        return
    os.makedirs(args.runs, exist_ok=True)
    log = os.path.join(args.runs, "commands.log")
    start = time.perf_counter()
    names = args.strategies.split(",")
    results = {
        "command": " ".join([".venv/bin/python", "benchmarks/tune_study.py", *sys.argv[1:]]),
        "machine": machine_description(),
        "versions": package_versions(),
        "trials": args.trials,
        "max_train_samples": args.max_train_samples,
        "seed": args.seed,
        "total_minutes": 0.0,
        "strategies": {},
    }
    for name in names:
        results["strategies"][name] = study_one(name, args, log)
        # Written after every strategy, so a stopped study still leaves what it measured.
        results["total_minutes"] = (time.perf_counter() - start) / 60
        results["finished"] = len(results["strategies"]) == len(names)
        write_json(args.out + ".json", results)
        tmp = args.out + ".md.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(report(results))
        os.replace(tmp, args.out + ".md")
    print(report(results))


if __name__ == "__main__":
    main()
