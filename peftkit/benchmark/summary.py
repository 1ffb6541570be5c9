"""How a suite's rows are read, the same way by the suite, results.json and the report: which
metric is "how good" (``QUALITY``, ``SECOND``, ``quality_of``), which rows the table and plots show
(``shown_rows``), each strategy's summary over its seeds (``summarize``), the paired test of every
strategy against the best on the same test examples (``compare_to_best``), the input-blind baseline
(``summarize_baseline``) and the strategies that do not beat it (``not_above_baseline``).

The statistics themselves (the paired bootstrap, McNemar's test, the t-interval) are the generic
``peftkit.stats``; this module applies them to a suite's rows.
"""

from __future__ import annotations

import statistics
from typing import Any

from ..metrics import summarize_figures
from ..stats import LEVEL, RESAMPLES, from_bits, mean_interval, paired_bootstrap

# What "how good" means in a suite's table and plots, by what its runs measured: accuracy
# (classification; a causal LM's generated labels), else exact match of generated answers, else
# perplexity (plain text; lower is better). (row key, label, higher is better)
QUALITY = (
    ("test_accuracy", "test accuracy", True),
    ("test_exact_match", "exact match", True),
    ("test_perplexity", "test perplexity", False),
)
# the second column: macro-F1 for classification, perplexity for a language model
SECOND = (("test_f1_macro", "macro-F1", True), ("test_perplexity", "perplexity", False))


def shown_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows the table and plots are of: the tuned ones where the suite was tuned, those of the
    largest training-set size where it ran several, else all."""
    rows = [r for r in results["rows"] if r.get("configuration", "tuned") == "tuned"]
    sizes = [r["train_size"] for r in rows if r.get("train_size") is not None]
    return [r for r in rows if r.get("train_size") == max(sizes)] if sizes else rows


def not_above_baseline(
    summary: dict[str, dict[str, Any]],
    baseline: dict[str, Any] | None,
    quality: tuple[str, str, bool],
    runs: bool = True,
) -> list[str]:
    """Strategies whose quality (mean over seeds) is not better than the baseline's (a model that
    learned nothing but the most frequent label scores exactly that), or with a run that learned
    nothing by its own verdict (``learned_nothing``: within a binomial test of the majority rate,
    or a causal LM's perplexity no better than zero-shot; not with ``runs`` false)."""
    key, _label, higher = quality
    metric = key.removeprefix("test_")
    known = bool(baseline) and baseline.get(metric) is not None
    worse = (lambda v: v <= baseline[metric]) if higher else (lambda v: v >= baseline[metric])
    return [
        name
        for name, v in summary.items()
        if (runs and v.get("learned_nothing"))
        or (known and v.get(f"{key}_mean") is not None and worse(v[f"{key}_mean"]))
    ]


def spread(values: list[float]) -> float | None:
    """The sample standard deviation of ``values``; None for fewer than two (no spread to measure)."""
    return statistics.stdev(values) if len(values) > 1 else None


def quality_of(rows: list[dict[str, Any]], choices: tuple = QUALITY) -> tuple[str, str, bool]:
    """The first of ``choices`` that every successful row measured (QUALITY[0] if none ran)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    for key, label, higher in choices:
        if ok and all(r.get(key) is not None for r in ok):
            return key, label, higher
    return choices[0]


def summarize(rows: list[dict[str, Any]], strategies: list[str]) -> dict[str, dict[str, Any]]:
    """Per strategy: mean and spread over the seeds that ran, the worst peak, the usual time."""
    quality = quality_of(rows)[0]
    second = quality_of(rows, SECOND)[0]
    out: dict[str, dict[str, Any]] = {}
    for name in strategies:
        mine = [r for r in rows if r["strategy"] == name]
        ok = [r for r in mine if r["status"] == "ok"]
        if not ok:
            statuses = {r["status"] for r in mine}
            status = next(iter(statuses)) if len(statuses) == 1 else "failed"
            out[name] = {
                "status": status if status in ("does not fit", "not applicable") else "failed",
                "error": next((r["error"] for r in mine if r["error"]), None),
                "seeds": [],
            }
            continue
        acc = [r[quality] for r in ok]
        first = [r["history"][0]["epoch_seconds"] for r in ok if r.get("history")]
        later = [e["epoch_seconds"] for r in ok for e in r.get("history", [])[1:]]
        out[name] = {
            "status": "ok" if len(ok) == len(mine) else "partly failed",
            "seeds": [r["seed"] for r in ok],
            f"{quality}_mean": statistics.mean(acc),
            f"{quality}_std": spread(acc),
            # the mean's 95% interval over seeds (t-based; None with one seed: no spread to measure)
            f"{quality}_ci95": as_list(mean_interval(acc)),
            f"{quality}_min": min(acc),
            f"{quality}_max": max(acc),
            f"{second}_mean": (
                statistics.mean(r[second] for r in ok) if all(r.get(second) is not None for r in ok) else None
            ),
            **summarize_figures(ok),
            "first_epoch_seconds_mean": statistics.mean(first) if first else None,
            "later_epoch_seconds_mean": statistics.mean(later) if later else None,
            "levers": ok[0].get("levers", "-"),
            "predicted_peak_bytes": ok[0].get("predicted_peak_bytes"),
            # the seeds whose run learned nothing (each run's own verdict, metrics.json `learned`)
            "learned_nothing": [r["seed"] for r in ok if r.get("learned") is False],
        }
        predicted, measured = out[name]["predicted_peak_bytes"], ok[0]["peak_memory_bytes"]
        # how far the planner was from the measured peak of the same run (issue target: within 20%)
        out[name]["prediction_error"] = predicted / measured - 1 if predicted and measured else None
    return out


def as_list(interval: tuple[float, float] | None) -> list[float] | None:
    """An interval as JSON holds it (a list), None kept."""
    return list(interval) if interval is not None else None


def correct_by_seed(rows: list[dict[str, Any]], key: str) -> dict[str, dict[int, list[int]]]:
    """Per strategy and seed, each test example's correctness (1/0, the split's order), from the
    successful rows that recorded one whose mean is the row's ``key`` (so the paired test is on
    the figure the table ranks by, and never on a record of something else)."""
    out: dict[str, dict[int, list[int]]] = {}
    for r in rows:
        text = r.get("per_example_correct") if r.get("status") == "ok" else None
        if text and r.get(key) is not None and abs(text.count("1") / len(text) - r[key]) < 1e-4:
            out.setdefault(r["strategy"], {})[r["seed"]] = from_bits(text)
    return out


def against_best(best: dict[int, list[int]], other: dict[int, list[int]]) -> dict[str, Any]:
    """One strategy's paired test against the best on the seeds both recorded, on the same test
    examples (same seed, same split); the verdict ``not distinguishable`` or ``distinguishable``
    at ``LEVEL``, or ``no per-example record`` when no seed pairs up."""
    seeds = sorted(s for s in set(best) & set(other) if len(best[s]) == len(other[s]))
    if not seeds:
        return {"verdict": "no per-example record", "seeds": []}
    c = paired_bootstrap([other[s] for s in seeds], [best[s] for s in seeds], RESAMPLES, seed=0, level=LEVEL)
    return {
        "difference": c.difference,
        "ci95": [c.low, c.high],
        "p_value": c.p_value,
        "bootstrap_p": c.bootstrap_p,
        "mcnemar_p": c.mcnemar_p,
        "examples": c.examples,
        "only_this_right": c.a_only,
        "only_best_right": c.b_only,
        "seeds": seeds,
        "verdict": "distinguishable" if c.distinguishable() else "not distinguishable",
    }


def compare_to_best(
    rows: list[dict[str, Any]], summary: dict[str, dict[str, Any]], quality: tuple[str, str, bool]
) -> dict[str, Any] | None:
    """Every strategy against the best one (by mean quality over seeds): the paired bootstrap over
    the test examples both answered (``peftkit.stats.paired_bootstrap``), its difference (this
    minus the best), 95% interval, p-value and verdict. None when no strategy has a quality."""
    key, _label, higher = quality
    means = {n: v[f"{key}_mean"] for n, v in summary.items() if v.get(f"{key}_mean") is not None}
    if not means:
        return None
    best = (max if higher else min)(means, key=means.__getitem__)
    correct = correct_by_seed(rows, key)
    return {
        "best": best,
        "metric": key,
        "level": LEVEL,
        "resamples": RESAMPLES,
        "method": "paired bootstrap over test examples, stratified by seed; p_value: the larger of its "
        "p and exact McNemar's on the pooled pairs",
        "strategies": {n: against_best(correct.get(best, {}), correct.get(n, {})) for n in means if n != best},
    }


def summarize_baseline(per_seed: dict[int, dict[str, Any] | None] | None) -> dict[str, Any] | None:
    """The input-blind baseline of each seed's test split (``Task.baseline``) as one entry of
    results.json: its name, what it predicts, each metric's mean over the seeds, and each seed's own."""
    known = {seed: b for seed, b in (per_seed or {}).items() if b}
    if not known:
        return None
    first = next(iter(known.values()))
    metrics = [k for k, v in first.items() if isinstance(v, (int, float)) and all(k in b for b in known.values())]
    predicts = sorted({str(b["predicts"]) for b in known.values()})
    return {
        "name": first["name"],
        "predicts": " / ".join(predicts),
        **{k: statistics.mean(b[k] for b in known.values()) for k in metrics},
        "seeds": {str(seed): b for seed, b in known.items()},
    }
