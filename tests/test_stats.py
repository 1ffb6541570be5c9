"""peftkit.stats on constructed cases whose answers are known (by hand or by a closed form)."""

from __future__ import annotations

import math

import pytest

from peftkit.stats import bits, from_bits, mcnemar, mean_interval, paired_bootstrap


def test_mean_interval_is_t_based_and_needs_two_values() -> None:
    # 1, 2, 3: mean 2, sd 1; t(0.975, 2 degrees of freedom) = 4.302653 (a table's value)
    low, high = mean_interval([1.0, 2.0, 3.0])
    assert (low + high) / 2 == pytest.approx(2.0)
    assert (high - low) / 2 == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert mean_interval([0.8]) is None and mean_interval([]) is None
    assert mean_interval([0.5, 0.5, 0.5]) == pytest.approx((0.5, 0.5))  # no spread, no width


def test_mcnemar_is_the_exact_binomial_on_the_discordant_pairs() -> None:
    # 2 against 8 of 10 discordant pairs: p = 2 * (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 112 / 1024
    assert mcnemar(2, 8) == pytest.approx(112 / 1024)
    assert mcnemar(8, 2) == pytest.approx(112 / 1024)
    assert mcnemar(0, 0) == 1.0 and mcnemar(5, 5) == pytest.approx(1.0)
    assert mcnemar(0, 100) == pytest.approx(2 * 0.5**100)


def test_identical_predictions_are_not_distinguishable() -> None:
    same = [1, 0, 1, 1, 0] * 200
    c = paired_bootstrap([same], [same])
    assert c.difference == 0 and (c.low, c.high) == (0, 0)
    assert c.p_value == c.bootstrap_p == c.mcnemar_p == 1.0 and not c.distinguishable()
    assert (c.examples, c.a_only, c.b_only) == (1000, 0, 0)


def test_one_hundred_more_right_of_a_thousand_is_distinguishable() -> None:
    b = [1] * 700 + [0] * 300
    a = [1] * 800 + [0] * 200  # right on every example b gets, and on 100 more
    c = paired_bootstrap([a], [b])
    assert c.difference == pytest.approx(0.1) and c.distinguishable()
    assert c.p_value < 0.001 and c.mcnemar_p == pytest.approx(2 * 0.5**100)
    assert 0.07 < c.low < 0.1 < c.high < 0.13
    reverse = paired_bootstrap([b], [a])  # the sign follows the order
    assert reverse.difference == pytest.approx(-0.1) and reverse.high < 0 and reverse.distinguishable()


def test_the_interval_matches_the_normal_approximation() -> None:
    # 100 examples only a gets, 50 only b, of 1,000: d = 0.05, se = sqrt((0.15 - 0.05^2) / 1000) = 0.01214
    a = [1] * 100 + [0] * 50 + [1] * 600 + [0] * 250
    b = [0] * 100 + [1] * 50 + [1] * 600 + [0] * 250
    c = paired_bootstrap([a], [b], resamples=4000)
    se = math.sqrt((0.15 - 0.05**2) / 1000)
    assert c.low == pytest.approx(0.05 - 1.96 * se, abs=0.004)
    assert c.high == pytest.approx(0.05 + 1.96 * se, abs=0.004)
    assert c.mcnemar_p < 0.001 and c.p_value < 0.01


def test_a_small_difference_is_not_distinguishable_and_agrees_with_mcnemar() -> None:
    # 10 against 5 discordant examples: McNemar's p = 0.30
    a = [1] * 10 + [0] * 5 + [1] * 800 + [0] * 185
    b = [0] * 10 + [1] * 5 + [1] * 800 + [0] * 185
    c = paired_bootstrap([a], [b])
    assert c.mcnemar_p == pytest.approx(0.3018, abs=1e-4)
    assert not c.distinguishable() and c.low < 0 < c.high and 0.15 < c.bootstrap_p < 0.5


def test_few_discordant_examples_need_mcnemar_too() -> None:
    """5 examples of 1,000 that only a gets right: the bootstrap's resamples draw none of them only
    e^-5 of the time (p about 0.01), but 5 of 5 fair coin tosses going one way happen 1 time in 16
    (exact McNemar 0.0625): not distinguishable, on the careful test's word."""
    a, b = [1] * 855 + [0] * 145, [1] * 850 + [0] * 150
    c = paired_bootstrap([a], [b])
    assert c.bootstrap_p < 0.05 and c.mcnemar_p == pytest.approx(0.0625)
    assert c.p_value == c.mcnemar_p and not c.distinguishable()


def test_seeds_pair_within_themselves_and_weigh_the_same() -> None:
    """Seed 0: a 10 points ahead on 1,000 examples; seed 1: equal on 200 (another split, another
    size). The difference is the mean of the seeds' differences (5 points), as in the table."""
    seed0_a, seed0_b = [1] * 800 + [0] * 200, [1] * 700 + [0] * 300
    seed1 = [1, 0] * 100
    c = paired_bootstrap([seed0_a, seed1], [seed0_b, seed1])
    assert c.difference == pytest.approx(0.05) and c.examples == 1200 and (c.a_only, c.b_only) == (100, 0)
    assert c.low == pytest.approx(0.05 - 1.96 * 0.5 * math.sqrt(0.1 * 0.9 / 1000), abs=0.005)
    with pytest.raises(ValueError):
        paired_bootstrap([seed0_a], [seed1])  # not the same examples


def test_the_bootstrap_is_seeded() -> None:
    a, b = [1, 0, 1, 1] * 50, [1, 1, 0, 1] * 50
    assert paired_bootstrap([a], [b]) == paired_bootstrap([a], [b])
    assert paired_bootstrap([a], [b], seed=1) != paired_bootstrap([a], [b])


def test_bits_round_trip() -> None:
    assert bits([1, 0, True, False]) == "1010" and bits(None) is None
    assert from_bits("0110") == [0, 1, 1, 0]
