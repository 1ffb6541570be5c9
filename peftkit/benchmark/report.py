"""The report of a ``peftkit bench`` suite: results.md, rendered from what results.json holds.

The suite (``peftkit.benchmark.suite``) writes results.json; this module turns those results into
what a person reads (``markdown_report``): the header (command, machine, versions, settings), the
main table (the best of each column in bold), the input-blind baseline and the † beside a strategy
that does not beat it, how sure the ranking is (the paired test), the "Default vs tuned" and
"Accuracy against training-set size" sections, and what the columns mean. ``peftkit bench`` prints
the notes and sections under its table too (``peftkit.cli``). The report is a pure function of the
results: an older results.json renders the same report again. Which metric is "how good" and which
rows the table shows are read as the suite reads them (``peftkit.benchmark.summary``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ..durations import format_duration, format_seconds
from ..memory import format_size
from ..plots import curves_skipped
from ..stats import LEVEL, RESAMPLES
from .summary import QUALITY, SECOND, not_above_baseline, shown_rows


def _best(summary: dict[str, dict[str, Any]], key: str, pick: Callable[..., Any]) -> Any:
    values = [v[key] for v in summary.values() if v.get(key) is not None]
    return pick(values) if values else None


def markdown_report(results: dict[str, Any], plots: list[str]) -> str:
    """The table a person reads, best value in each column in bold, with its provenance."""
    q, q_label, q_higher = results.get("quality", QUALITY[0])
    f, f_label, f_higher = results.get("second", SECOND[0])
    summary = results["summary"]
    best = {
        "acc": _best(summary, f"{q}_mean", max if q_higher else min),
        "f1": _best(summary, f"{f}_mean", max if f_higher else min),
        "pct": _best(summary, "trainable_percent", min),
        "mem": _best(summary, "peak_memory_bytes", min),
        "inc": _best(summary, "peak_memory_increase_bytes", min),
        "time": _best(summary, "train_seconds_mean", min),
        "speed": _best(summary, "samples_per_second_mean", max),
        "size": _best(summary, "adapter_bytes", min),
    }
    intervals = any(v.get(f"{q}_ci95") for v in summary.values())  # none (one seed, older results): as before
    tuned = (
        [
            f"Tuned: each strategy's row is its best configuration of `--tune {results['tuning']['trials']}` "
            '(its defaults beside it under "Default vs tuned").',
            "",
        ]
        if results.get("tuning")
        else []
    )
    tuned += sizes_shown(results)
    lines = (
        _report_header(results)
        + tuned
        + [
            f"| strategy | trainable | {q_label} ({'± 95% CI' if intervals else '± sd'}) | {f_label} | peak "
            "train memory | predicted (error) "
            "| over loaded model | eval peak | train time | epoch 1 / later | examples/s | adapter "
            "| micro-batch × accum | levers |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    )
    flagged = not_above_baseline(summary, results.get("baseline"), results.get("quality", QUALITY[0]))
    for name, v in summary.items():
        if v["status"] in ("does not fit", "failed", "not applicable"):
            lines.append(f"| `{name}` | {v['status']}: {v['error']} |" + " |" * 12)
        else:
            cells = _report_cells(name, v, q, f, best)
            cells[0] += " †" if name in flagged else ""
            lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + note if (note := baseline_note(results)) else []
    lines += [""] + comparison_note(results) if results.get("comparison") else []
    lines += [""] + tuning_report(results) if results.get("tuning") else []
    lines += [""] + sizes_report(results) if results.get("train_sizes") else []
    lines += _report_footer(results, q_label, intervals)
    skipped = curves_skipped(results) if plots and "validation_curves.png" not in plots else None
    lines += [f"![{os.path.splitext(p)[0]}]({p})" for p in plots] + ([f"({skipped}.)"] if skipped else [])
    return "\n".join(lines) + "\n"


def baseline_note(results: dict[str, Any]) -> list[str]:
    """The lines under the table: the input-blind baseline (``results["baseline"]``), what the †
    beside a strategy means, and for each run that learned nothing what it measured and the
    likely cause (``learned_notes``); none without a baseline or such a run."""
    b = results.get("baseline")
    quality = results.get("quality", QUALITY[0])
    if not b:
        return learned_notes(results)
    flagged = not_above_baseline(results["summary"], b, quality, runs=False)  # the runs' own: learned_notes
    figures = ", ".join(
        f"{label} {b[key.removeprefix('test_')]:.4f}"
        for key, label, _ in (quality, results.get("second", SECOND[0]))
        if b.get(key.removeprefix("test_")) is not None
    )
    seeds = "" if len(b.get("seeds", {})) < 2 else ", mean over seeds"
    lines = [
        f"Baseline, {b['name']} (always `{b['predicts']}`, the most frequent of the test split): "
        f"{figures or 'not comparable with these metrics'}{seeds}."
    ]
    if flagged:
        lines.append(
            f"† not better than the baseline's {quality[1]}: "
            f"{'it' if len(flagged) == 1 else 'each'} may have learned no more than always to answer "
            f"`{b['predicts']}`."
        )
    return lines + learned_notes(results)


def learned_notes(results: dict[str, Any]) -> list[str]:
    """A line per strategy with runs that learned nothing (their ``learned`` false): the seeds, and
    the first such run's own note (what it measured, the likely cause, the flag to try)."""
    out = []
    for name, v in results["summary"].items():
        seeds = v.get("learned_nothing") or []
        row = next(
            (
                r
                for r in shown_rows(results)
                if r.get("strategy") == name
                and r.get("status") == "ok"
                and r.get("seed") in seeds
                and r.get("learned_note")
            ),
            None,
        )
        if seeds:
            which = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"
            out.append(f"† `{name}` learned nothing ({which})" + (f": {row['learned_note']}." if row else "."))
    return out


def _points(fraction: float) -> str:
    """A difference of two accuracies in points, signed: -0.4, +1.2 (0.0 without a sign)."""
    return f"{100 * fraction:+.1f}" if round(100 * fraction, 1) else "0.0"


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}" if p < 0.1 else f"p = {p:.2f}"


def comparison_note(results: dict[str, Any]) -> list[str]:
    """The lines under the table on how sure the ranking is (``results["comparison"]``): which
    strategies the paired test cannot tell from the best, which it can, and, with one seed, that
    the ranking has no interval across seeds."""
    comparison = results["comparison"]
    best, level = comparison["best"], f"{100 * comparison['level']:.0f}%"
    tested = {n: c for n, c in comparison["strategies"].items() if c["verdict"] != "no per-example record"}
    one_seed = max((len(v.get("seeds", [])) for v in results["summary"].values()), default=0) < 2
    lines = []
    if one_seed:
        lines.append(
            "One seed: the ranking carries no interval across seeds (how much another training run "
            "would move each figure is not measured; `--seeds 0,1,2` measures it)."
            + (
                " The paired test below is over that seed's test examples: it tells a difference from "
                "the test set's sampling noise, not from the variation between training runs."
                if tested
                else ""
            )
        )

    def listed(verdict: str) -> str:
        items = [
            f"`{n}` (difference {_points(c['difference'])} points, {level} CI "
            f"[{_points(c['ci95'][0])}, {_points(c['ci95'][1])}], {_p(c['p_value'])})"
            for n, c in tested.items()
            if c["verdict"] == verdict
        ]
        return ", ".join(items) if items else "none"

    if tested:
        lines += [
            f"Not distinguishable from the best (`{best}`) at the {level} level: {listed('not distinguishable')}.",
            f"Distinguishable from it: {listed('distinguishable')}.",
        ]
    untested = [n for n in comparison["strategies"] if n not in tested]
    if untested:
        lines.append(
            f"No paired test for {', '.join(f'`{n}`' for n in untested)}: "
            f"{'its' if len(untested) == 1 else 'their'} runs (or `{best}`'s) recorded no per-example "
            "correctness on the same test examples."
        )
    return lines


def _mean_cell(v: dict[str, Any], q: str) -> str:
    """A summary's mean quality with its 95% interval's half-width (sd with several seeds and no
    interval) and the number of seeds: ``0.8125 ± 0.0123 (n=3)``."""
    spread = ""
    if v.get(q + "_ci95"):
        spread = f" ± {(v[q + '_ci95'][1] - v[q + '_ci95'][0]) / 2:.4f}"
    elif v.get(q + "_std") is not None:
        spread = f" ± sd {v[q + '_std']:.4f}"
    return f"{v[q + '_mean']:.4f}{spread} (n={len(v['seeds'])})"


def tuning_report(results: dict[str, Any]) -> list[str]:
    """The "Default vs tuned" section (``results["tuning"]``): per strategy its validation and
    test quality in each configuration, the change with its paired test, then the tuned settings."""
    t = results["tuning"]
    q, q_label, _ = results.get("quality", QUALITY[0])
    level = f"{100 * LEVEL:.0f}%"
    bound = f", at most {t['timeout']} each" if t.get("timeout") else ""
    lines = [
        "## Default vs tuned",
        "",
        f"Each strategy was first tuned (`peftkit tune`: {t['trials']} trials each{bound}, trial 0 its "
        f"defaults, selected on validation {t['metric']} of seed {t['seed']}); then its defaults and its "
        f"best configuration each ran on test over the seeds. Change: tuned minus default {q_label}, in "
        f"points, with its paired {level} interval and p over the same test examples. The p beside "
        f"the validation figures is the same test of the best trial against the defaults' on the "
        f"validation examples (where recorded): above 0.05, tuning's gain may be noise.",
        "",
        f"| strategy | trials | validation {t['metric']} default → tuned | {q_label} default | "
        f"{q_label} tuned | change |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in t["strategies"].items():
        d, u = t["default_summary"].get(name, {}), results["summary"].get(name, {})
        if e["status"] != "ok":
            lines.append(f"| `{name}` | {e['status']}: {e['error']} | | | | |")
            continue
        test = [_mean_cell(v, q) if v.get(q + "_mean") is not None else v.get("status", "-") for v in (d, u)]
        c = t["versus_default"].get(name)
        change = (
            f"{_points(u[q + '_mean'] - d[q + '_mean'])}"
            if d.get(q + "_mean") is not None and u.get(q + "_mean") is not None
            else "-"
        )
        if e.get("same_as_default"):
            change = "0.0 (the same runs)"
        elif c and c["verdict"] != "no per-example record":
            change += f" ([{_points(c['ci95'][0])}, {_points(c['ci95'][1])}], {_p(c['p_value'])})"
        validation = " → ".join(
            "-" if x is None else f"{x:.4f}" for x in (e["default_validation"], e["best_validation"])
        )
        v = e.get("validation_versus_defaults")
        if v:  # the gain tune selected on, paired over the validation examples: noise or not
            validation += f" ({_p(v['p_value'])})"
        lines.append(f"| `{name}` | {e['trials']} | {validation} | {test[0]} | {test[1]} | {change} |")
    return (
        lines
        + ["", "Tuned settings (each study, its trials and best.yaml in tuning/STRATEGY/):", ""]
        + [
            f"- `{name}`: " + (_tuned_settings(e) if e["status"] == "ok" else f"none ({e['status']})")
            for name, e in t["strategies"].items()
        ]
    )


def _size_label(size: int, t: dict[str, Any]) -> str:
    return f"{size:,} (all)" if size == t["whole"] else f"{size:,}"


def sizes_shown(results: dict[str, Any]) -> list[str]:
    """The line above the main table of a ``--train-sizes`` suite: which size it (and the plots) show."""
    t = results.get("train_sizes")
    if not t:
        return []
    whole = " (the whole training split)" if t["shown"] == t["whole"] else ""
    return [
        f"Training-set sizes {', '.join(_size_label(z, t) for z in t['sizes'])}: this table, its plots and "
        f"paired tests are of the largest, {t['shown']:,} examples{whole}; every size under "
        '"Accuracy against training-set size".',
        "",
    ]


def sizes_report(results: dict[str, Any]) -> list[str]:
    """The "Accuracy against training-set size" section (``results["train_sizes"]``): a row per
    strategy, a column per size, each cell the mean over seeds ± the half-width of its 95% interval,
    the best of each column in bold, the baseline under it."""
    t = results["train_sizes"]
    q, q_label, higher = results.get("quality", QUALITY[0])
    seeds = max((len(c["seeds"]) for e in t["strategies"].values() for c in e.values()), default=0)
    spread = f"mean ± half-width of the 95% interval over {seeds} seeds" if seeds > 1 else "one seed"
    lines = [
        "## Accuracy against training-set size",
        "",
        f"Test {q_label.removeprefix('test ')} ({spread}) of each strategy trained on the first N examples of "
        "each seed's shuffled training split: the sizes are nested, each one's examples are the first of the "
        "next one's. Best of each column in **bold**; runs in runs/NAME-nSIZE-seedN/; the curves in "
        "learning_curve.png.",
        "",
        "| strategy | " + " | ".join(_size_label(z, t) for z in t["sizes"]) + " |",
        "|---|" + "---|" * len(t["sizes"]),
    ]
    best = {
        z: _best({n: e[str(z)] for n, e in t["strategies"].items()}, "mean", max if higher else min) for z in t["sizes"]
    }
    b = results.get("baseline") or {}
    floor = b.get(q.removeprefix("test_"))
    flagged = False
    for name, entry in t["strategies"].items():
        cells = [_size_cell(entry[str(z)], best[z], floor, higher) for z in t["sizes"]]
        flagged = flagged or any(c.endswith("†") for c in cells)
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    if floor is not None:
        lines += [
            "",
            f"Baseline, {b['name']} (always `{b['predicts']}`): {q_label} {floor:.3f} at every size "
            "(the test split does not change with the training examples)."
            + (
                f" † not better than it: that run may have learned no more than always to answer `{b['predicts']}`."
                if flagged
                else ""
            ),
        ]
    return lines


def _size_cell(cell: dict[str, Any], best: float | None, floor: float | None, higher: bool) -> str:
    """``0.812 ± 0.010`` (one seed: ``0.812``), bold when it is the column's best, † when it is not
    better than the baseline's ``floor``; the status where no run of it succeeded."""
    if cell["mean"] is None:
        return cell["status"]
    text = f"{cell['mean']:.3f}"
    text = f"**{text}**" if cell["mean"] == best else text
    if cell.get("ci95"):
        text += f" ± {(cell['ci95'][1] - cell['ci95'][0]) / 2:.3f}"
    text += f" ({cell['status']})" if cell["status"] != "ok" else ""
    worse = floor is not None and (cell["mean"] <= floor if higher else cell["mean"] >= floor)
    return text + (" †" if worse else "")


def _tuned_settings(entry: dict[str, Any]) -> str:
    if entry.get("same_as_default"):
        return "the defaults won (trial #0): its tuned rows are its default runs"
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry["settings"].items())
    return f"trial #{entry['best_trial']}: {shown}"


def _report_header(results: dict[str, Any]) -> list[str]:
    """The report's title and provenance: command, machine, versions, plugins, settings."""
    s = results["settings"]
    machine = results["machine"]
    mem = f", {format_size(machine['memory_bytes'])} RAM" if machine.get("memory_bytes") else ""
    # the defaults rise on a small training set (Strategy.schedule): each run's metrics.json says how
    epochs = s["epochs"] or "each strategy's default, raised to its min_steps on a small training set"
    return [
        f"# peftkit bench: `{s['model']}` on `{s['dataset']}` ({s.get('task', 'sequence-classification')})",
        "",
        f"- Command: `{results['command']}`",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores{mem}; device: {results['device']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
        f"- Plugins: {', '.join(f'{k} ({v})' for k, v in results['plugins'].items()) or 'none'}",
        f"- Settings: effective batch {s['batch_size']}, max length {s['max_length']}, seeds "
        f"{','.join(map(str, s['seeds']))}, epochs {epochs}, "
        f"training examples {_train_examples(results)}, memory budget {s['memory_budget'] or 'none'}",
        f"- Memory: {results['memory_method']}",
        f"- Created {results['created']}; the whole suite took "
        f"{format_duration(results['suite_seconds'], hours=False)}",
        "",
    ]


def _train_examples(results: dict[str, Any]) -> str:
    """The header's training examples: the cap, or each size of a ``--train-sizes`` suite, or all."""
    t = results.get("train_sizes")
    if t:
        return ", ".join(_size_label(z, t) for z in t["sizes"])
    return str(results["settings"]["max_train_samples"] or "all")


def _report_cells(name: str, v: dict[str, Any], q: str, f: str, best: dict[str, Any]) -> list[str]:
    """One strategy's row of the table; the best value of a column (``best``) in bold."""

    def mark(text: str, value: Any, key: str) -> str:
        return f"**{text}**" if value is not None and value == best[key] else text

    sd = f" ± {v[q + '_std']:.4f}" if v[q + "_std"] is not None else ""
    count = f"n={len(v['seeds'])}"
    if v.get(q + "_ci95"):  # the mean's 95% interval is symmetric (t-based): its half-width, sd beside
        low, high = v[q + "_ci95"]
        sd, count = f" ± {(high - low) / 2:.4f}", f"{count}, sd {v[q + '_std']:.4f}"
    later = v["later_epoch_seconds_mean"]
    epochs = f"{format_seconds(v['first_epoch_seconds_mean'])} / {format_seconds(later) if later is not None else '-'}"
    status = "" if v["status"] == "ok" else f" ({v['status']})"
    return [
        f"`{name}`{status}",
        mark(f"{v['trainable_percent']:.3g}%", v["trainable_percent"], "pct") + f" ({v['trainable_params']:,})",
        mark(f"{v[q + '_mean']:.4f}", v[q + "_mean"], "acc") + f"{sd} ({count})",
        mark(f"{v[f + '_mean']:.4f}", v[f + "_mean"], "f1") if v.get(f + "_mean") is not None else "-",
        mark(format_size(v["peak_memory_bytes"]), v["peak_memory_bytes"], "mem"),
        (
            f"{format_size(v['predicted_peak_bytes'])} ({v['prediction_error']:+.0%})"
            if v.get("prediction_error") is not None
            else "-"
        ),
        mark("+" + format_size(v["peak_memory_increase_bytes"]), v["peak_memory_increase_bytes"], "inc"),
        format_size(v["peak_memory_eval_bytes"]),
        mark(format_seconds(v["train_seconds_mean"]), v["train_seconds_mean"], "time"),
        epochs,
        mark(f"{v['samples_per_second_mean']:.0f}", v["samples_per_second_mean"], "speed"),
        mark(format_size(v["adapter_bytes"]), v["adapter_bytes"], "size"),
        f"{v['batch_size']} × {v['grad_accumulation']}",
        v.get("levers", "-"),
    ]


def _report_footer(results: dict[str, Any], q_label: str, intervals: bool = False) -> list[str]:
    """What the columns mean (``intervals``: the quality has 95% intervals over seeds, not a bare
    ± sd), how the paired test works where one ran, and what was tried before a run fitted its budget."""
    spread = (
        "(with several seeds ± is the half-width of the 95% t-interval of that mean, sd the sample "
        "standard deviation of the seeds)"
        if intervals
        else "(± sample standard deviation when there are several)"
    )
    lines = [
        "",
        f"Best value of each column in **bold**. The {q_label} is on the test split, mean over seeds "
        f"{spread}. Train time counts training steps only (not evaluation); examples/s is over training "
        "steps.",
        "",
    ]
    comparison = results.get("comparison") or {}
    if any(c["verdict"] != "no per-example record" for c in comparison.get("strategies", {}).values()):
        lines += [
            "How sure the ranking is: each strategy is paired with the best one on the same test examples "
            "(same seed, same split) and the difference of their accuracies is resampled over those "
            f"examples ({RESAMPLES:,} paired bootstrap resamples, within each seed; the difference is the mean "
            "over seeds); p is the larger of the bootstrap's and the exact McNemar test's (on the examples "
            "only one of the two gets right), since the bootstrap alone is too confident when few examples "
            "differ. Not distinguishable: p ≥ 0.05, the test set cannot tell the two apart at the 95% level; "
            "it does not say they are equal. The seeds stay fixed: this is test-set noise for these trained "
            "models, the ± over seeds is the variation between training runs. results.json has the same "
            "figures under `comparison`.",
            "",
        ]
    lines += [
        "Predicted: `peftkit plan`'s prediction for the same settings, made before the run "
        "(error = predicted / measured - 1).",
        "",
    ]
    shrunk = [r for r in results["rows"] if len(r.get("tried", [])) > 1]
    if shrunk:
        lines += ["What was tried before a run fitted the budget (micro-batch, levers, outcome):", ""]
        for r in shrunk:
            tried = ", ".join(f"{t['batch_size']} ({t.get('levers', '-')}): {t['outcome']}" for t in r["tried"])
            lines.append(
                f"- `{r['strategy']}`{' (tuned)' if r.get('configuration') == 'tuned' else ''} "
                f"seed {r['seed']}: {tried}"
            )
        lines.append("")
    return lines


def first_table(markdown: str) -> str:
    """The report's main table: its first run of ``|`` lines (a tuned report has a second)."""
    lines = markdown.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[first:end])
