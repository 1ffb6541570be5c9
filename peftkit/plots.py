"""The benchmark's plots: what a table of numbers makes hard to see.

- ``accuracy_vs_memory.png``: test accuracy against peak training memory, with the Pareto front
  (strategies no other one beats on both) joined by a line;
- ``accuracy_vs_time.png``: test accuracy against training time;
- ``validation_curves.png``: validation accuracy after each epoch, per strategy; left out when
  every strategy trained a single epoch (a dot each is no curve: ``curves_skipped``);
- ``learning_curve.png`` (``bench --train-sizes``): test accuracy against training examples.

Points are means over seeds; with several seeds, error bars show the mean's 95% interval over the
seeds (t-based, ``peftkit.stats.mean_interval``; results written before intervals show ± sd).

``peftkit eval`` draws its confusion matrix here too (``write_confusion_matrix``).
"""

from __future__ import annotations

import os
from typing import Any


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names whose (cost, accuracy) no other point beats: lower-or-equal cost and higher-or-equal
    accuracy, one of them strictly. Returned in order of increasing cost."""
    front: list[str] = []
    best_acc = float("-inf")
    for name, (_cost, acc) in sorted(points.items(), key=lambda kv: (kv[1][0], -kv[1][1])):
        if acc > best_acc:
            front.append(name)
            best_acc = acc
    return front


def _scatter(
    ax: Any, summary: dict[str, dict[str, Any]], xkey: str, scale: float, front: list[str] | None, q: str, q_label: str
) -> None:
    colors = {name: f"C{i % 10}" for i, name in enumerate(summary)}
    # labels of points close in x alternate above and below, so neighbours do not overwrite each other
    by_x = sorted(summary, key=lambda n: summary[n][xkey])
    for rank, name in enumerate(by_x):
        v = summary[name]
        x, y = v[xkey] / scale, v[q + "_mean"]
        ax.errorbar(x, y, yerr=_error_bar(v, q), fmt="o", color=colors[name], capsize=3, markersize=7)
        ax.annotate(
            name,
            (x, y),
            textcoords="offset points",
            xytext=(6, 6 if rank % 2 == 0 else -13),
            fontsize=9,
            color=colors[name],
        )
    if front:
        xs = [summary[n][xkey] / scale for n in front]
        ys = [summary[n][q + "_mean"] for n in front]
        ax.step(xs, ys, where="post", color="0.4", linestyle="--", linewidth=1)
        ax.scatter(
            xs,
            ys,
            s=180,
            facecolors="none",
            edgecolors="0.3",
            linewidths=1.2,
            label="Pareto front (none beats these on both)",
        )
        ax.legend(loc="best", fontsize=8)
    ax.margins(x=0.12, y=0.08)
    ax.grid(True, alpha=0.3)
    intervals = any(v.get(q + "_ci95") for v in summary.values())
    ax.set_ylabel(q_label + (" (bars: 95% interval over seeds)" if intervals else ""))


def _error_bar(v: dict[str, Any], q: str) -> float:
    """Half the height of a point's error bar: its 95% interval over seeds (symmetric, t-based);
    for results written before intervals, the standard deviation, as drawn then; 0 with one seed."""
    if v.get(q + "_ci95"):
        low, high = v[q + "_ci95"]
        return (high - low) / 2
    return v.get(q + "_std") or 0


def write_plots(results: dict[str, Any], out_dir: str) -> list[str]:
    """Write the three PNGs into ``out_dir``; returns their file names (none if nothing ran)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none assumed
    import matplotlib.pyplot as plt

    q, q_label, higher = results.get("quality", ("test_accuracy", "test accuracy", True))
    summary = {k: v for k, v in results["summary"].items() if v.get(q + "_mean") is not None}
    if not summary:
        return []
    settings = results["settings"]
    title = f"{settings['model']} on {settings['dataset']} ({results['device']})"
    written = []

    # accuracy against each cost, the cheapest-for-their-accuracy strategies ringed
    for key, scale, xlabel, what, filename in (
        ("peak_memory_bytes", 2**30, "peak training memory (GiB)", "memory", "accuracy_vs_memory.png"),
        ("train_seconds_mean", 1.0, "training time (s)", "training time", "accuracy_vs_time.png"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        # the front wants "higher is better": a perplexity is turned round for it
        front = pareto_front({n: (v[key], v[q + "_mean"] if higher else -v[q + "_mean"]) for n, v in summary.items()})
        _scatter(ax, summary, key, scale, front, q, q_label)
        ax.set_xlabel(xlabel)
        ax.set_title(f"{q_label.capitalize()} against {what}\n{title}", fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, filename), dpi=120)
        plt.close(fig)
        written.append(filename)

    if curves_skipped(results) is None:
        _validation_curves(plt, results, summary, title, out_dir)
        written.append("validation_curves.png")
    return written


def curves_skipped(results: dict[str, Any]) -> str | None:
    """Why ``validation_curves.png`` is not drawn (one validation point per strategy, after its
    only epoch: the history records one per epoch), or None when it is."""
    histories = [r["history"] for r in results["rows"] if r.get("history")]
    if histories and max(len(h) for h in histories) > 1:
        return None
    return (
        "no validation curves: every strategy trained one epoch, so each has a single validation "
        "point (validation is measured after each epoch); train more epochs (--epochs) to see them"
    )


def _validation_curves(
    plt: Any, results: dict[str, Any], summary: dict[str, dict[str, Any]], title: str, out_dir: str
) -> None:
    """Each strategy's validation metric after each epoch (mean over seeds), on whole epochs."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [r for r in results["rows"] if r.get("history")]
    curve = (
        "validation_accuracy"
        if all(e.get("validation_accuracy") is not None for r in rows for e in r["history"])
        else "validation_perplexity"
    )
    for i, name in enumerate(summary):
        curves = [r["history"] for r in results["rows"] if r["strategy"] == name and r.get("history")]
        n_epochs = max(len(c) for c in curves)
        means = []
        for e in range(n_epochs):
            vals = [c[e][curve] for c in curves if len(c) > e]
            means.append(sum(vals) / len(vals))
        ax.plot(range(1, n_epochs + 1), means, marker="o", markersize=4, color=f"C{i % 10}", label=name)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(curve.replace("_", " "))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9)
    ax.set_title(f"{curve.replace('_', ' ').capitalize()} per epoch (mean over seeds)\n{title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "validation_curves.png"), dpi=120)
    plt.close(fig)


def write_learning_curve(results: dict[str, Any], out_dir: str) -> bool:
    """``learning_curve.png``: the suite's quality metric against training examples (log axis), a
    line with markers per strategy through its means over seeds (error bars: the 95% interval,
    with several seeds), the baseline's figure dashed. False (nothing written) when nothing ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = results["train_sizes"]
    q, q_label, _ = results.get("quality", ("test_accuracy", "test accuracy", True))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for i, (name, entry) in enumerate(t["strategies"].items()):
        points = [(z, entry[str(z)]) for z in t["sizes"] if entry[str(z)]["mean"] is not None]
        if not points:
            continue
        bars = [(c["ci95"][1] - c["ci95"][0]) / 2 if c.get("ci95") else 0.0 for _z, c in points]
        ax.errorbar(
            [z for z, _c in points],
            [c["mean"] for _z, c in points],
            yerr=bars if any(bars) else None,
            marker="o",
            markersize=5,
            capsize=3,
            color=f"C{i % 10}",
            label=name,
        )
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    baseline = (results.get("baseline") or {}).get(q.removeprefix("test_"))
    if baseline is not None:
        ax.axhline(
            baseline, color="0.4", linestyle="--", linewidth=1, label=f"{results['baseline']['name']} ({baseline:.3f})"
        )
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.set_xticks(t["sizes"], labels=[f"{z:,}" + ("\n(all)" if z == t["whole"] else "") for z in t["sizes"]])
    ax.xaxis.set_minor_formatter(NullFormatter())  # only the sizes that ran are labelled
    ax.set_xlabel("training examples (log scale)")
    seeds = max((len(c["seeds"]) for e in t["strategies"].values() for c in e.values()), default=0)
    ax.set_ylabel(q_label + (" (bars: 95% interval over seeds)" if seeds > 1 else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    s = results["settings"]
    ax.set_title(f"{q_label.capitalize()} against training-set size\n{s['model']} on {s['dataset']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "learning_curve.png"), dpi=120)
    plt.close(fig)
    return True


def write_confusion_matrix(matrix: list[list[int]], names: list[str], path: str, title: str) -> None:
    """A confusion matrix (rows true, columns predicted) as a PNG, counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay

    side = min(12.0, 3.0 + 0.5 * len(names))
    fig, ax = plt.subplots(figsize=(side + 1, side))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=names).plot(
        ax=ax, cmap="Blues", colorbar=False, values_format="d", xticks_rotation=45 if len(names) > 4 else "horizontal"
    )
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
