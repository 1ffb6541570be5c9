"""The statistics behind a benchmark's comparisons: how sure a ranking of strategies is.

Two kinds of uncertainty, answered apart:

- **across seeds** (``mean_interval``): each seed trains another model (and, where the data has no
  fixed split, draws another split), so a strategy's accuracy varies from seed to seed. The mean
  over n seeds gets a t-based 95% interval (n >= 2; with one seed there is no spread to measure,
  so none).
- **across test examples** (``paired_bootstrap``, ``mcnemar``): two strategies trained with the
  same seed are tested on the same examples, so their difference is judged example by example.
  Pairing removes what both find easy or hard, which makes the test far sharper than comparing
  two accuracies (and their intervals) side by side.

Pure numpy and scipy (no torch): it is imported by the report, which runs without a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

LEVEL = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class PairedComparison:
    """One strategy (``a``) against another (``b``) on the same test examples.

    ``difference`` is mean accuracy of ``a`` minus that of ``b`` (a fraction: 0.01 is one point);
    ``low``/``high`` its ``level`` interval (bootstrap)."""

    difference: float
    low: float
    high: float
    bootstrap_p: float
    """Two-sided, for "no difference", from the same resamples as the interval."""
    examples: int
    """Paired examples, over every seed."""
    a_only: int
    """Examples ``a`` got right and ``b`` wrong (McNemar's discordant pairs, with ``b_only``)."""
    b_only: int
    mcnemar_p: float
    """The exact McNemar test on the same pairs, pooled over seeds."""
    level: float = LEVEL

    @property
    def p_value(self) -> float:
        """The p-value the verdict uses: the larger of the bootstrap's and exact McNemar's. The
        bootstrap is too confident when few examples differ (5 examples of 1,000 that only one
        strategy gets right: bootstrap p 0.01, exact McNemar 0.06, since 5 heads in 5 fair coin
        tosses happen 1 time in 16); McNemar pools the seeds rather than weighing each the same.
        A difference is claimed only when both find it."""
        return max(self.bootstrap_p, self.mcnemar_p)

    def distinguishable(self) -> bool:
        """Whether the difference is unlikely to be test-set noise at ``level`` (p < 1 - level)."""
        return self.p_value < 1 - self.level


def mean_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float] | None:
    """The t-based ``level`` interval of the mean of ``values`` (mean ± t * sd / sqrt(n)), or None
    for fewer than two values. t (not the normal's 1.96) because n is a handful of seeds: with 3
    seeds t is 4.30, and the interval is honest about how little three numbers say."""
    from scipy.stats import t

    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def mcnemar(a_only: int, b_only: int) -> float:
    """The exact (binomial) McNemar test's two-sided p-value: under "equally good", each of the
    ``a_only + b_only`` discordant examples is equally likely to go either way. 1.0 with none."""
    from scipy.stats import binomtest

    n = a_only + b_only
    return 1.0 if n == 0 else float(binomtest(a_only, n, 0.5).pvalue)


def above_rate_p(correct: int, examples: int, rate: float) -> float:
    """One-sided exact binomial p-value that ``correct`` right answers of ``examples`` come from a
    predictor whose true accuracy is only ``rate`` (an input-blind one's): small when the accuracy
    is clearly above it. 1.0 with no examples."""
    from scipy.stats import binomtest

    if examples <= 0:
        return 1.0
    return float(
        binomtest(max(0, min(correct, examples)), examples, min(max(rate, 0.0), 1.0), alternative="greater").pvalue
    )


def paired_bootstrap(
    a: Sequence[Sequence[int]],
    b: Sequence[Sequence[int]],
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
) -> PairedComparison:
    """Compare per-example correctness (1/0) of two strategies, one list per seed, each pair of
    lists on the same test examples in the same order (the same seed, so the same split).

    The statistic is the difference of the accuracies averaged over seeds (each seed weighs the
    same, as in the table's mean over seeds). Each resample draws, within every seed, as many
    examples as the seed has, with replacement (a stratified bootstrap: a seed's examples are never
    paired with another seed's). The interval is the resamples' percentile interval; the p-value
    is twice the smaller share of resamples on either side of zero (with the usual +1 so that it
    is never 0), so p < 1 - level exactly when the interval leaves out zero, up to the resampling's
    granularity.

    Why this, not McNemar alone: it gives an interval in accuracy points (what a reader weighs),
    and it combines seeds of different test sets without pooling them into one table. The seeds
    stay fixed: it measures test-set noise for these trained models; the spread of training across
    seeds is ``mean_interval``'s. McNemar's exact p on the pooled pairs comes with it, and the
    verdict needs both (``PairedComparison.p_value``).

    Each example's paired outcome is +1, 0 or -1, so a resampled seed's mean depends only on how
    many of each were drawn: a multinomial draw, O(resamples) instead of O(resamples x examples).
    """
    import numpy as np

    if len(a) != len(b) or not a:
        raise ValueError("paired_bootstrap needs the same, non-zero number of seeds on both sides")
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    observed, a_only, b_only, examples = 0.0, 0, 0, 0
    for left, right in zip(a, b):
        x, y = np.asarray(left, dtype=np.int8), np.asarray(right, dtype=np.int8)
        if x.shape != y.shape or not len(x):
            raise ValueError("each seed's two lists must cover the same, non-empty test examples")
        up, down = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
        n = len(x)
        counts = rng.multinomial(n, [up / n, down / n, 1 - (up + down) / n], size=resamples)
        total += (counts[:, 0] - counts[:, 1]) / n
        observed += (up - down) / n
        a_only, b_only, examples = a_only + up, b_only + down, examples + n
    diffs = total / len(a)
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    tail = min(int((diffs <= 0).sum()), int((diffs >= 0).sum()))
    p = min(1.0, (2 * tail + 1) / (resamples + 1))
    return PairedComparison(
        observed / len(a), float(low), float(high), p, examples, a_only, b_only, mcnemar(a_only, b_only), level
    )


def bits(correct: Sequence[int | bool] | None) -> str | None:
    """Per-example correctness as a compact string of ``0``/``1`` (metrics.json, results.json)."""
    return None if correct is None else "".join("1" if c else "0" for c in correct)


def from_bits(text: str) -> list[int]:
    """``bits``' inverse."""
    return [1 if c == "1" else 0 for c in text]
