"""Paired changes and their standard errors (mechhi.intervene.effects), checked against
by-hand formulas and against the spread of the estimates over simulated repeats."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mechhi.intervene.effects import paired_change, paired_ratio, ratio_change, seed_spread, summary


def paired_samples(rng, n: int):
    """Correlated per-sample values of a base and an edited setup (same samples)."""
    shared = rng.normal(size=n)
    base = 1.0 + 0.5 * shared + 0.2 * rng.normal(size=n)
    edited = base + 0.3 + 0.1 * rng.normal(size=n)
    return edited, base


def test_identity_change_is_the_mean_difference_with_its_paired_se():
    rng = np.random.default_rng(0)
    x, y = paired_samples(rng, 50)
    out = paired_change(x, y)
    assert out["mean"] == pytest.approx(x.mean() - y.mean())
    assert out["se"] == pytest.approx((x - y).std(ddof=1) / math.sqrt(50))
    unpaired = math.sqrt(summary(x)["se"] ** 2 + summary(y)["se"] ** 2)
    assert out["se"] < unpaired / 2, "pairing should remove the shared sample variation"


@pytest.mark.parametrize("kind", ["exp", "ratio", "share"])
def test_standard_errors_match_the_spread_over_repeats(kind):
    """The reported SE against the standard deviation of the estimate over 2000 simulated repeats."""
    rng = np.random.default_rng(1)
    estimates, ses = [], []
    for _ in range(2000):
        x, y = paired_samples(rng, 80)
        if kind == "exp":
            out = paired_change(x, y, "exp")
        elif kind == "ratio":
            out = paired_ratio(x, y)
        else:
            said_x, said_y = rng.integers(1, 4, 80), rng.integers(1, 4, 80)
            right_x = rng.binomial(said_x, 0.7)
            right_y = np.minimum(said_y, right_x + rng.integers(0, 2, 80))  # correlated with the edited setup
            out = ratio_change(right_x, said_x, right_y, said_y)
        estimates.append(out["mean"])
        ses.append(out["se"])
    assert np.mean(ses) == pytest.approx(np.std(estimates), rel=0.08)


def test_exp_change_is_the_perplexity_difference():
    x, y = np.array([0.1, 0.4, 0.3]), np.array([0.2, 0.2, 0.1])
    assert paired_change(x, y, "exp")["mean"] == pytest.approx(math.exp(x.mean()) - math.exp(y.mean()))
    assert summary(y, "exp")["mean"] == pytest.approx(math.exp(y.mean()))


def test_shares_and_edge_cases():
    out = ratio_change([1, 2, 0], [2, 2, 1], [2, 2, 1], [2, 2, 1])
    assert out["mean"] == pytest.approx(3 / 5 - 1.0)
    assert math.isnan(ratio_change([0, 0], [0, 0], [1, 1], [1, 1])["mean"])
    assert math.isnan(paired_ratio([1, 2], [0, 0])["mean"])
    with pytest.raises(ValueError, match="same samples needed"):
        paired_change([1.0, 2.0], [1.0])


def test_seed_spread_and_how_many_seeds_go_as_far():
    changes = [-0.4, -0.1, -0.6, 0.2, -0.3]
    out = seed_spread(changes, probe=-0.4)
    assert out["mean"] == pytest.approx(np.mean(changes)) and out["sd"] == pytest.approx(
        np.std(changes, ddof=1)
    )
    assert (out["q25"], out["median"], out["q75"]) == pytest.approx(
        tuple(np.percentile(changes, [25, 50, 75]))
    )
    assert out["as_extreme"] == pytest.approx(2 / 5)  # -0.4 and -0.6
    ratios = [1.1, 0.9, 1.4, 1.25]
    assert seed_spread(ratios, probe=1.25, centre=1.0)["as_extreme"] == pytest.approx(2 / 4)  # 1.4 and 1.25
