"""The learning-rate sweep behind each ``peft:`` method's default (issue 34, item 5).

For each method, ``peftkit run --strategy peft:NAME --lr LR`` on a seeded subset of the embedded
default (all-MiniLM-L6-v2 on Rotten Tomatoes), over a grid of learning rates around a starting rate
(factors of 4 by default: 1/4, 1, 4 times it). Each run trains as ``peftkit run`` does on a training
set that small: the method's default epochs raised to reach its minimum optimizer steps (150), with
early stopping. (A first try at the default epochs as given, 1 epoch = 47 steps on 1,500 examples,
left LoRA-like methods at the majority class at every rate: too few steps to rank rates by.) Where the
best validation accuracy lies at an edge of the grid, the grid grows one more factor that way (up
to ``--extend`` times), so the rate chosen is a measured optimum, not the grid's end. The rate is
chosen on **validation** accuracy only; the test accuracy is shown beside it, not used.

Each run is its own process and keeps its directory; a run whose directory holds metrics.json is
reused, so an interrupted sweep continues where it stopped.

    .venv/bin/python benchmarks/peft_sweep.py                      # the methods below
    .venv/bin/python benchmarks/peft_sweep.py --methods ia3,vera   # some of them

Output: benchmarks/results/peft_sweep_cpu.json, .md and .png (validation accuracy against the
learning rate, a line per method); the runs under runs/peft-sweep/. The report keeps the methods
of earlier calls that a call does not name (as recorded), and lists every call's command; a method
that does not apply to the model gets its one-line refusal as its row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

METHODS = "ia3,loha,lokr,adalora,oft,boft,vera,fourierft,ln_tuning,prompt_tuning,hra,shira"


def cpu_model() -> str:
    """The CPU's model name (times are only comparable on one model)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_one(peftkit: str, method: str, lr: float, args: argparse.Namespace) -> dict | str:
    """One run (reused where its metrics.json exists); its metrics, or why it failed (peftkit's
    one-line error: a method that does not apply to the model is refused so)."""
    run_dir = os.path.join(args.runs_dir, method, f"lr{lr:.3g}")
    metrics_path = os.path.join(run_dir, "metrics.json")
    if not os.path.exists(metrics_path):
        print(f"  {method} lr {lr:.3g} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        cmd = [peftkit, "run", "--strategy", f"peft:{method}", "--lr", f"{lr:.3g}"]
        cmd += ["--max-train-samples", str(args.train_samples), "--max-eval-samples", str(args.eval_samples)]
        cmd += ["--seed", "0", "--output-dir", run_dir]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or ["?"])[-1]
            print(f"  failed: {why}", file=sys.stderr)
            return why
        with open(metrics_path) as fh:
            m = json.load(fh)
        m["command_wall_seconds"] = time.perf_counter() - start
        with open(metrics_path, "w") as fh:
            json.dump(m, fh, indent=2)
    with open(metrics_path) as fh:
        return json.load(fh)


def sweep(peftkit: str, method: str, start_lr: float, args: argparse.Namespace) -> dict:
    """Every rate tried for one method, the grid grown at an edge that holds the best."""
    factor = args.factor
    rates = [start_lr / factor, start_lr, start_lr * factor]
    results: dict[float, dict] = {}
    # rates an earlier call ran beyond this grid (where it grew at an edge) are kept
    mine = os.path.join(args.runs_dir, method)
    for name in sorted(os.listdir(mine)) if os.path.isdir(mine) else []:
        path = os.path.join(mine, name, "metrics.json")
        if name.startswith("lr") and os.path.exists(path):
            with open(path) as fh:
                results[float(name[2:])] = json.load(fh)

    def rank(lr: float) -> tuple[float, bool]:
        # validation accuracy; a tie goes to the starting rate (no change to a default without evidence)
        return results[lr]["validation_accuracy"], math.isclose(lr, start_lr, rel_tol=1e-3)

    failed = None
    for _ in range(args.extend + 1):
        for lr in rates:
            if not any(math.isclose(lr, done, rel_tol=1e-3) for done in results):
                m = run_one(peftkit, method, lr, args)
                if isinstance(m, str):
                    failed = m
                    if m.startswith("error: strategy") and "does not apply" in m:
                        break  # refused for the model: every rate would be
                else:
                    results[lr] = m
        if not results:
            break
        best = max(results, key=rank)
        # the edges of everything tried (an earlier call may have grown the grid already)
        lowest, highest = min(min(rates), min(results)), max(max(rates), max(results))
        if best == lowest:
            rates = [*rates, lowest / factor]
        elif best == highest:
            rates = [*rates, highest * factor]
        else:
            break
    tried = [
        {
            "lr": lr,
            "validation_accuracy": m["validation_accuracy"],
            "test_accuracy": m["test_accuracy"],
            "learned": m.get("learned"),
            "epochs_run": m["epochs_run"],
            "best_epoch": m.get("best_epoch"),
            "train_seconds": m["train_seconds"],
            "trainable_params": m["trainable_params"],
        }
        for lr, m in sorted(results.items())
    ]
    best_lr = max(results, key=rank) if results else None
    found = {"start_lr": start_lr, "default_epochs": get_defaults(method).epochs, "tried": tried, "best_lr": best_lr}
    if not results and failed:
        found["failed"] = failed
    return found


def get_defaults(method: str):
    """The method's training defaults as peftkit has them now."""
    from peftkit.strategies.peft_methods import DEFAULTS, LORA_LIKE

    return DEFAULTS.get(method, LORA_LIKE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=METHODS, help="peft methods, comma-separated (without peft:)")
    ap.add_argument("--factor", type=float, default=4.0, help="ratio between neighbouring rates")
    ap.add_argument("--extend", type=int, default=1, help="times the grid may grow at an edge")
    ap.add_argument("--train-samples", type=int, default=1500)
    ap.add_argument("--eval-samples", type=int, default=400)
    ap.add_argument("--note", action="append", default=[], help="a line for the report (how the sweep was run)")
    ap.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "peft-sweep"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "peft_sweep_cpu"))
    args = ap.parse_args()

    peftkit = os.path.join(os.path.dirname(sys.executable), "peftkit")
    methods = [m for m in args.methods.split(",") if m]
    # the starting rate is the one the sweep began from (recorded, so a rerun after the defaults
    # moved to the measured optimum reuses the same runs)
    earlier: dict = {}
    if os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as fh:
            earlier = json.load(fh)
    previous: dict = earlier.get("methods", {})
    started = time.perf_counter()
    found: dict[str, dict] = {}
    for i, method in enumerate(methods, 1):
        start_lr = previous.get(method, {}).get("start_lr", get_defaults(method).lr)
        print(f"[{i}/{len(methods)}] peft:{method}", file=sys.stderr, flush=True)
        found[method] = sweep(peftkit, method, start_lr, args)

    # the report keeps the methods of earlier calls that this one did not name, as they were recorded
    methods_all = {**{m: v for m, v in previous.items() if m not in found}, **found}
    command = " ".join(
        [os.path.relpath(sys.executable, ROOT), "benchmarks/peft_sweep.py"]
        + [a for i, a in enumerate(sys.argv[1:]) if a != "--note" and (i == 0 or sys.argv[i] != "--note")]
    )
    commands = [
        c for c in earlier.get("commands", [earlier["command"]] if "command" in earlier else []) if c != command
    ]
    versions = {}
    first_dir = next(
        (os.path.join(args.runs_dir, m, f"lr{v['best_lr']:.3g}") for m, v in found.items() if v["best_lr"]), None
    )
    if first_dir:
        with open(os.path.join(first_dir, "metrics.json")) as fh:
            versions = json.load(fh).get("versions", {})
    elif earlier.get("versions"):
        versions = earlier["versions"]
    result = {
        # the command without its --note lines (the report lists those); the earlier calls' before it
        "command": command,
        "commands": [*commands, command],
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "versions": versions,
        "settings": {
            "model": "minilm",
            "dataset": "rotten_tomatoes",
            "train_samples": args.train_samples,
            "eval_samples": args.eval_samples,
            "seed": 0,
            "factor": args.factor,
        },
        "sweep_seconds_this_call": round(time.perf_counter() - started, 1),
        "notes": [*[n for n in earlier.get("notes", []) if n not in args.note], *args.note],
        "methods": methods_all,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(result, fh, indent=2)
    write_markdown(result, args.out + ".md")
    plot(result, args.out + ".png")


def write_markdown(result: dict, path: str) -> None:
    """The table: each method's rates, validation accuracy at each, the chosen one in bold."""
    s = result["settings"]
    lines = [
        "# Learning-rate sweep of the `peft:` methods (issue 34, item 5)",
        "",
        "- Commands, each continuing the last (every finished run reused; the methods a call did not name "
        "kept as recorded):",
        *[f"  - `{c}`" for c in result.get("commands", [result["command"]])],
        f"- Machine: {result['machine']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        f"- Data: `{s['model']}` on `{s['dataset']}`, {s['train_samples']:,} training examples (seeded subset, "
        f"seed {s['seed']}), {s['eval_samples']} validation and {s['eval_samples']} test examples; each run trains "
        "as `peftkit run` does on so few examples (default epochs raised to 150 optimizer steps, early stopping); "
        f"rates a factor {s['factor']:g} apart, the grid grown at an edge holding the best",
        "- Chosen on validation accuracy only (bold); test accuracy beside it is not used to choose",
        *[f"- {note}" for note in result.get("notes", [])],
        "",
        "| method | default epochs | trainable | learning rate: validation accuracy (test), epochs run | chosen |",
        "|---|---|---|---|---|",
    ]
    for method, v in result["methods"].items():
        if not v["tried"]:
            why = v.get("failed", "every run failed").replace("|", "\\|")
            lines.append(f"| `peft:{method}` | {v['default_epochs']} | - | did not run: {why} | - |")
            continue
        cells = []
        for t in v["tried"]:
            text = f"{t['lr']:.3g}: {t['validation_accuracy']:.3f} ({t['test_accuracy']:.3f}), {t['epochs_run']}"
            if t["lr"] == v["best_lr"]:
                text = f"**{text}**"
            if t.get("learned") is False:
                text += " †"
            cells.append(text)
        params = v["tried"][0]["trainable_params"]
        row = f"| `peft:{method}` | {v['default_epochs']} | {params:,} | {'; '.join(cells)} | {v['best_lr']:.3g} |"
        lines.append(row)
    lines += ["", "† the run learned nothing (no better than the majority class).", "", "![sweep](peft_sweep_cpu.png)"]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(result: dict, path: str) -> None:
    """Validation accuracy against the learning rate (log scale): one small panel per method on
    shared axes (36 lines on one axis cannot be told apart), the chosen rate starred, the runs that
    learned nothing hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = {m: v for m, v in result["methods"].items() if v["tried"]}
    if not swept:
        return
    cols = min(6, len(swept))
    rows = math.ceil(len(swept) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.2 * cols, 1.8 * rows + 0.6), sharex=True, sharey=True, squeeze=False
    )
    lo = min(t["validation_accuracy"] for v in swept.values() for t in v["tried"])
    for ax, (method, v) in zip(axes.flat, swept.items()):
        xs = [t["lr"] for t in v["tried"]]
        ys = [t["validation_accuracy"] for t in v["tried"]]
        ax.plot(xs, ys, color="tab:blue", linewidth=1)
        for t in v["tried"]:
            learned = t.get("learned") is not False
            ax.plot(
                [t["lr"]],
                [t["validation_accuracy"]],
                marker="o",
                markersize=4,
                color="tab:blue",
                markerfacecolor="tab:blue" if learned else "white",
            )
        best = next(t for t in v["tried"] if t["lr"] == v["best_lr"])
        ax.plot([best["lr"]], [best["validation_accuracy"]], marker="*", markersize=12, color="tab:orange")
        ax.set_title(f"{method} ({best['lr']:.3g})", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(swept) :]:
        ax.set_visible(False)
    axes[0][0].set_xscale("log")
    axes[0][0].set_ylim(max(0.45, math.floor(lo * 20) / 20), None)
    fig.supxlabel("learning rate", fontsize=9)
    fig.supylabel("validation accuracy", fontsize=9)
    fig.suptitle(
        "peft methods on the embedded default: validation accuracy by learning rate "
        "(star: chosen; hollow: learned nothing)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
