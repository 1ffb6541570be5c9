"""What ``peftkit recommend`` leaves in its output directory: recommend.md (the paragraph first, then
the finalists' table, how sure the ranking is, the search's history), results.json, the plots
(accuracy against memory and time: ``plots.write_plots``; the search: ``search.png``) and ``best/``
(the winner's adapter and a config.yaml that ``peftkit run --config`` reproduces it from).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import yaml

from ..benchmark.report import baseline_note, comparison_note, first_table, markdown_report
from ..durations import format_duration
from ..files import private_dir, publish_modes, write_json
from ..memory import format_size
from ..plots import write_plots
from ..registry import get_strategy
from ..strategies.base import default_point
from .config import RecommendConfig
from .decide import Decision, decide
from .search import VALIDATION, Config, Search


def settings_words(config: Config, row: dict[str, Any] | None) -> str:
    """``defaults, 3 epochs`` or ``lr 1.1e-3, r 16, 3 epochs``: what differs from the strategy's
    defaults, and the epochs the run trained."""
    default = default_point(get_strategy(config.strategy))
    changed = [f"{k} {_short(v)}" for k, v in config.settings.items() if default.get(k) != v]
    epochs = row.get("epochs_run") if row else None
    return ", ".join((changed or ["defaults"]) + ([f"{epochs} epoch{'s' if epochs != 1 else ''}"] if epochs else []))


def write_report(
    config: RecommendConfig,
    search: Search,
    finalists: list[Config],
    reached: int,
    dropped: dict[str, dict[str, Any]],
    results: dict[str, Any],
    out: str,
) -> tuple[Decision, dict[str, Any]]:
    """Decide, then write every report file into ``out`` (each replaced whole). Returns the decision
    and what results.json holds."""
    size = search.sizes[reached]
    words = {
        c.strategy: settings_words(c, (r.row if (r := search.ledger.find(c, size, config.seeds[0])) else None))
        for c in finalists
    }
    decision = decide(results, words, _notes(config, search, finalists, reached, dropped))
    results["recommendation"] = {
        "strategy": decision.strategy,
        "most_accurate": decision.best,
        "also_fine": decision.also_fine,
        "paragraph": decision.paragraph,
        "settings": {c.strategy: {"configuration": c.number, **c.settings} for c in finalists},
    }
    results["search"] = {
        "rung_sizes": search.sizes,
        "reached": size,
        "eta": config.eta,
        "time_budget_seconds": config.budget_seconds,
        "seconds": search.clock.spent_before + search.clock.elapsed,
        "candidates": search.candidates,
        "dropped": dropped,
        "not_run": search.skipped,
        "runs": [
            {
                "strategy": r.strategy,
                "configuration": r.number,
                "train_size": r.size,
                "seed": r.seed,
                "validation": r.value,
                "status": r.row.get("status"),
                "seconds": round(r.seconds, 1),
                "run_dir": r.row.get("run_dir"),
            }
            for r in search.ledger.runs
        ],
    }
    stage = private_dir(".report.partial-", out)
    try:
        plots = write_plots(results, stage) if results.get("comparison") else []
        if _search_plot(search, os.path.join(stage, "search.png")):
            plots.append("search.png")
        write_json(os.path.join(stage, "results.json"), results)
        with open(os.path.join(stage, "recommend.md"), "w", encoding="utf-8") as fh:
            fh.write(_markdown(config, search, finalists, results, decision, plots))
        if decision.strategy is not None:
            _best(search, finalists, decision.strategy, size, out, stage)
        publish_modes(stage)
        for name in sorted(os.listdir(stage)):
            target = os.path.join(out, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(stage, name), target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return decision, results


def _notes(
    config: RecommendConfig, search: Search, finalists: list[Config], reached: int, dropped: dict[str, dict[str, Any]]
) -> list[str]:
    """Sentences on what did not reach the final: dropped before the search, left out by a rung, or
    not run for the budget."""
    notes = []
    for s, d in dropped.items():
        if d["reason"] == "does not fit":
            notes.append(f"{s} does not fit {config.memory_budget} (planned {format_size(d['planned_peak_bytes'])}).")
        else:
            notes.append(f"{s} cannot run here ({d['error']}).")
    final = {c.strategy for c in finalists}
    for s in search.candidates:
        if s in final:
            continue
        best_rung = max(
            (i for i, z in enumerate(search.sizes) if any(r.strategy == s and r.size == z for r in search.ledger.runs)),
            default=None,
        )
        if best_rung is None:
            notes.append(f"{s} was not run (the time budget ran out first).")
            continue
        ranked = search.ranked(search.sizes[best_rung])
        mine = [v for c, v in ranked if c.strategy == s]
        if not mine:
            notes.append(f"{s} failed at {search.sizes[best_rung]:,} examples.")
            continue
        notes.append(
            f"{s} was left out after {search.sizes[best_rung]:,} training examples (best validation "
            f"{_value(mine[0])}, against {_value(ranked[0][1])} for {ranked[0][0].strategy})."
        )
    if reached < len(search.sizes) - 1:
        notes.append(
            f"The budget ended the search at {search.sizes[reached]:,} training examples, before the whole "
            f"{search.sizes[-1]:,}: a larger --time-budget would compare the finalists on all of them."
        )
    if search.ledger.runs and all(r.number == 0 for r in search.ledger.runs):
        notes.append(
            "Only the defaults ran: the finalists' other seeds needed the rest of the budget, which left none for "
            "other configurations (a larger --time-budget, fewer --seeds or --max-train-samples would search more)."
        )
    if search.skipped:
        notes.append(f"{len(search.skipped)} run(s) were not started for the time budget (recommend.md lists them).")
    return notes


def _value(v: float) -> str:
    return f"{v:.3f}" if v >= 0 else f"{-v:.3f} (perplexity)"


def _short(value: Any) -> str:
    return f"{value:.2g}" if isinstance(value, float) else str(value)


def _markdown(
    config: RecommendConfig,
    search: Search,
    finalists: list[Config],
    results: dict[str, Any],
    decision: Decision,
    plots: list[str],
) -> str:
    m = results["machine"]
    lines = [
        f"# peftkit recommend: `{config.model}` on `{config.dataset}`",
        "",
        decision.paragraph,
        "",
        f"- Command: `{config.command or 'peftkit.recommend(...)'}`",
        f"- Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {format_size(m.get('memory_bytes') or 0)} RAM; "
        f"device: {results['device']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
        f"- Budget: {format_duration(config.budget_seconds)} (used "
        f"{format_duration(results['search']['seconds'])}), memory {config.memory_budget or 'no budget'}; "
        f"seeds {', '.join(map(str, config.seeds))}",
        f"- Search: successive halving (eta {config.eta}) over strategy x configuration, rungs of "
        f"{', '.join(f'{s:,}' for s in search.sizes)} training examples, selected on validation only; the "
        "finalists compared on the test split (paired test on the same examples)",
        "",
    ]
    if results.get("comparison"):
        report = markdown_report(results, [])
        lines += ["## Finalists", "", first_table(report), "", *baseline_note(results), *comparison_note(results), ""]
    lines += ["## The search", "", "| strategy | configuration | settings | examples | seed | validation | time |"]
    lines += ["|---|---|---|---|---|---|---|"]
    configs = {(c.strategy, c.number): c for cs in search.ledger.configs.values() for c in cs}
    for r in search.ledger.runs:
        c = configs.get((r.strategy, r.number))
        key = next((k for k, _l, _h in VALIDATION if r.row.get(k) is not None), None)
        shown = f"{r.row[key]:.4f}" if key else f"{r.row.get('status')}: {r.row.get('error')}"
        lines.append(
            f"| {r.strategy} | #{r.number} | {settings_words(c, None) if c else '?'} | {r.size:,} | {r.seed} | "
            f"{shown} | {format_duration(r.seconds, hours=False)} |"
        )
    if search.skipped:
        lines += ["", "Not started for the time budget:", *[f"- {s}" for s in search.skipped]]
    lines += ["", *[f"![{p[:-4]}]({p})" for p in plots]]
    if decision.strategy:
        lines += [
            "",
            "The recommended adapter: `best/adapter`; `peftkit run --config best/config.yaml` trains it again.",
        ]
    return "\n".join(lines) + "\n"


def _best(search: Search, finalists: list[Config], strategy: str, size: int, out: str, stage: str) -> None:
    """``best/adapter`` (the winner's first seed's adapter) and ``best/config.yaml`` (its run's
    settings, without the run directory, so that ``peftkit run --config`` trains it again)."""
    chosen = next(c for c in finalists if c.strategy == strategy)
    run = search.ledger.find(chosen, size, search.config.seeds[0])
    if run is None or not run.row.get("run_dir"):
        return
    source = os.path.join(out, run.row["run_dir"])
    best = os.path.join(stage, "best")
    os.makedirs(best)
    shutil.copytree(os.path.join(source, "adapter"), os.path.join(best, "adapter"))
    with open(os.path.join(source, "config.yaml"), encoding="utf-8") as fh:
        recorded = yaml.safe_load(fh)
    recorded.pop("output_dir", None)
    with open(os.path.join(best, "config.yaml"), "w", encoding="utf-8") as fh:
        yaml.safe_dump(recorded, fh, sort_keys=False)


def _search_plot(search: Search, path: str) -> bool:
    """Validation against training examples, a line per configuration coloured by strategy: how the
    halving went. Where every run had one rung (a small budget, or a training set too small to
    halve), validation per strategy instead: on a one-point x axis the dots of equal values hid each
    other. False when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for r in search.ledger.runs:
        if r.value is not None and r.seed == search.config.seeds[0]:
            points.setdefault((r.strategy, r.number), []).append((r.size, abs(r.value)))
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours = {s: f"C{i % 10}" for i, s in enumerate(search.candidates)}
    sizes = {size for pts in points.values() for size, _v in pts}
    if len(sizes) == 1:
        order = [s for s in search.candidates if any(strategy == s for strategy, _n in points)]
        for (strategy, number), pts in sorted(points.items()):
            x, value = order.index(strategy), pts[0][1]
            ax.scatter([x], [value], color=colours.get(strategy, "k"), marker="o" if number == 0 else "x", s=45)
            ax.annotate(f"{value:.3f}", (x, value), textcoords="offset points", xytext=(7, -3), fontsize=7)
        ax.set_xticks(range(len(order)), order, rotation=20, ha="right")
        ax.set_xlim(-0.5, len(order) - 0.5)
        ax.set_xlabel(f"strategy (every run at one rung: {sizes.pop():,} training examples)")
        ax.set_title("The search: each configuration's validation (o: defaults, x: drawn)", fontsize=10)
    else:
        for (strategy, _n), pts in sorted(points.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colours.get(strategy, "k"), alpha=0.7)
        for s, colour in colours.items():
            ax.plot([], [], color=colour, label=s)
        ax.set_xscale("log")
        ax.set_xlabel("training examples (rung)")
        ax.set_title("The search: each configuration's validation at each rung it reached", fontsize=10)
        ax.legend(fontsize=8)
    ax.set_ylabel("validation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
