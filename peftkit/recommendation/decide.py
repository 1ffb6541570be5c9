"""``peftkit recommend``'s answer: the finalists compared on the test split, and one paragraph in
plain words.

The most accurate finalist (mean test accuracy over the seeds; perplexity for a language model) is
the answer, unless a cheaper one is as good: the paired test on the same test examples
(``benchmark.summary.compare_to_best``: bootstrap and exact McNemar) cannot tell them apart, the
interval of the difference rules out a loss of more than ``MARGIN``, and it uses no more memory and
no more time per epoch, and clearly less of one of them (``CLEARLY``: below that, a difference is
the machine's noise). Then the cheapest such finalist is recommended, and the paragraph says so. A
finalist as good but cheaper in one way only (faster but heavier) is named as "also fine", with what
it saves; one that is not distinguishable but may be worse by more than the margin is named with
how much worse it may be.

Why the margin: "not distinguishable" is not "as good". Three seeds of 300 test examples cannot
tell 3 points apart: a measured recommend under a memory budget found head_only 2.8 points below
LoRA, p = 0.061, 95% CI [-5.4, +0.1], and 97% faster, while the tuned bench on the same test examples
put it 4.0 points below tuned LoRA at p = 0.0097. Without the margin the cheapest candidate wins
whenever the test is too small to see its loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..memory import format_size

MARGIN = 0.02
"""The most a cheaper finalist may lose and still be recommended in place of the best: its paired
95% interval's worse end within 2 points of accuracy (for a lower-is-better metric such as
perplexity, within 2% of the best's value)."""

CLEARLY = 0.05
"""A cost counts as lower only when it is at least 5% lower: peak memory and epoch times of the same
run move by a few percent from run to run on a shared machine."""


@dataclass
class Decision:
    """The recommendation: which strategy, the most accurate one (``best``), and the paragraph."""

    strategy: str | None
    best: str | None
    paragraph: str
    also_fine: list[str]


def epoch_seconds(entry: dict[str, Any]) -> float | None:
    """A summary entry's training seconds per epoch (its mean train time over its epochs run)."""
    seconds, epochs = entry.get("train_seconds_mean"), entry.get("epochs")
    if seconds is None:
        return None
    return seconds / epochs if epochs else seconds


def _costs(entry: dict[str, Any]) -> tuple[float, float]:
    return float(entry.get("peak_memory_bytes") or 0), float(epoch_seconds(entry) or 0)


def _dominates(mine: tuple[float, float], theirs: tuple[float, float]) -> bool:
    """``mine`` costs no more than ``theirs`` in both and clearly less in one."""
    no_more = all(m <= t * (1 + CLEARLY) for m, t in zip(mine, theirs))
    clearly_less = any(m < t * (1 - CLEARLY) for m, t in zip(mine, theirs))
    return no_more and clearly_less


def decide(results: dict[str, Any], settings: dict[str, dict[str, Any]], notes: list[str]) -> Decision:
    """The recommendation from the finalists' ``results`` (``suite_results``: summary and paired
    comparison with the best); ``settings``: each finalist's configuration in words;
    ``notes``: sentences about what did not reach the final (dropped, eliminated), said last."""
    comparison = results.get("comparison")
    summary = results["summary"]
    key, label, higher = results["quality"]
    if not comparison:
        return Decision(None, None, " ".join(["No finalist finished a run on the test split.", *notes]), [])
    best = comparison["best"]
    verdicts = comparison["strategies"]
    allowed = MARGIN if higher else MARGIN * float(summary[best].get(f"{key}_mean") or 0)
    alike = [s for s, v in verdicts.items() if v.get("verdict") == "not distinguishable"]
    same = [s for s in alike if _worst_loss(verdicts[s], higher) <= allowed]
    cheaper = [s for s in same if _dominates(_costs(summary[s]), _costs(summary[best]))]
    chosen = min(cheaper, key=lambda s: _costs(summary[s])) if cheaper else best
    also = [s for s in same if s != chosen and s not in cheaper] + [s for s in cheaper if s != chosen]
    lines = [_use(chosen, summary[chosen], settings.get(chosen, ""), key, label)]
    if chosen != best:
        v = verdicts[chosen]
        lines.append(
            f"{best} was the most accurate ({_figure(summary[best], key)}), but {chosen} is not distinguishable "
            f"from it (p = {v['p_value']:.2g}, paired test on the same {v['examples']:,} test examples; at worst "
            f"{_amount(_worst_loss(v, higher), higher)} {'lower' if higher else 'worse'}) and "
            f"{_saves(summary[chosen], summary[best])}: the cheaper is recommended."
        )
    for s, v in verdicts.items():
        if s == chosen:
            continue
        if s in also:
            lines.append(
                f"{s} is not distinguishable (p = {v['p_value']:.2g}) and {_saves(summary[s], summary[chosen])}: "
                "also fine."
            )
        elif s in alike:
            lines.append(
                f"{s} is not distinguishable (p = {v['p_value']:.2g}) but may be as much as "
                f"{_amount(_worst_loss(v, higher), higher)} {'lower' if higher else 'worse'} (95% interval), more "
                f"than the margin of {_amount(allowed, higher)}; it {_saves(summary[s], summary[chosen])}."
            )
        elif v.get("verdict") == "distinguishable":
            points = abs(v["difference"]) * 100
            lines.append(f"{s} is {points:.1f} points {'lower' if higher else 'worse'} ({_p(v['p_value'])}).")
        elif s != best:
            lines.append(f"{s}: {v.get('verdict')} ({_figure(summary[s], key)}).")
    return Decision(chosen, best, " ".join(lines + notes), also)


def _worst_loss(verdict: dict[str, Any], higher: bool) -> float:
    """How much worse than the best a finalist may be at the worse end of its paired 95% interval
    (in the metric's units; 0 where even that end is no worse). Without an interval, its difference."""
    low, high = verdict.get("ci95") or (verdict.get("difference", 0.0),) * 2
    return max(0.0, -low if higher else high)


def _amount(value: float, higher: bool) -> str:
    """A difference in words: accuracy in points, another metric in its own units."""
    return f"{value * 100:.1f} points" if higher else f"{value:.3g}"


def _use(name: str, entry: dict[str, Any], settings: str, key: str, label: str) -> str:
    per_epoch = epoch_seconds(entry)
    if per_epoch is None:
        pace = ""
    else:  # two significant digits below 10 s (head_only's cached epochs: 0.17 s, not "0 s")
        pace = f", {per_epoch:.0f} s/epoch" if per_epoch >= 10 else f", {per_epoch:.2g} s/epoch"
    return (
        f"Use {name}{f' ({settings})' if settings else ''}: {_figure(entry, key)} {label}, "
        f"{format_size(entry.get('peak_memory_bytes') or 0)}{pace}."
    )


def _figure(entry: dict[str, Any], key: str) -> str:
    mean, ci = entry.get(f"{key}_mean"), entry.get(f"{key}_ci95")
    n = len(entry.get("seeds") or [])
    if mean is None:
        return "-"
    if ci:
        return f"{mean:.3f} ± {(ci[1] - ci[0]) / 2:.3f} (95%, {n} seeds)"
    return f"{mean:.3f} (1 seed)" if n == 1 else f"{mean:.3f}"


def _saves(mine: dict[str, Any], theirs: dict[str, Any]) -> str:
    """``uses 35% less memory and is 20% faster`` (what ``mine`` saves against ``theirs``), or says
    what it costs more where it saves nothing."""
    (m_mem, m_time), (t_mem, t_time) = _costs(mine), _costs(theirs)
    parts = []
    if t_mem and m_mem < t_mem * (1 - CLEARLY):
        parts.append(f"uses {100 * (1 - m_mem / t_mem):.0f}% less memory")
    if t_time and m_time < t_time * (1 - CLEARLY):
        parts.append(f"is {100 * (1 - m_time / t_time):.0f}% faster per epoch")
    if not parts:
        return "saves neither memory nor time"
    return " and ".join(parts)


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"
