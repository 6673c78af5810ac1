"""Head sets for the causal checks: a probe's top/bottom heads and the seeded random controls."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import xarray as xr

from mechhi.scoring.head_sets import (
    bottom_heads,
    depth_bins,
    overlap,
    per_layer,
    random_control,
    random_depth,
    random_matched,
    top_heads,
)


def scores(values) -> xr.DataArray:
    values = np.asarray(values, dtype=float)
    return xr.DataArray(
        values,
        dims=("layer", "head"),
        coords={"layer": np.arange(values.shape[0]), "head": np.arange(values.shape[1])},
    )


def test_top_and_bottom_against_a_sort_by_hand():
    rng = np.random.default_rng(0)
    values = rng.random((6, 4))
    values[2, 1] = np.nan  # never chosen
    flat = sorted(((v, (l, h)) for (l, h), v in np.ndenumerate(values) if np.isfinite(v)), reverse=True)
    assert top_heads(scores(values), 5) == tuple(sorted(head for _, head in flat[:5]))
    assert bottom_heads(scores(values), 3) == tuple(sorted(head for _, head in flat[-3:]))
    assert (2, 1) not in bottom_heads(scores(values), 23)
    with pytest.raises(ValueError, match="head set of 24: the probe scores 23 heads"):
        top_heads(scores(values), 24)


def test_ties_keep_layer_then_head_order():
    assert top_heads(scores(np.ones((3, 2))), 3) == ((0, 0), (0, 1), (1, 0))


def test_matched_sets_keep_the_heads_per_layer_and_vary_with_the_seed():
    chosen = ((0, 0), (0, 3), (0, 2), (4, 1), (9, 0))
    draws = [random_matched(chosen, n_heads=4, seed=s) for s in range(20)]
    for drawn in draws:
        assert per_layer(drawn) == {0: 3, 4: 1, 9: 1}
        assert len(set(drawn)) == len(drawn)
    assert random_matched(chosen, n_heads=4, seed=3) == draws[3], "not seeded"
    assert len(set(draws)) > 5, "the draws do not vary with the seed"
    # every head of layer 4 turns up over seeds: uniform within the layer
    assert {h for d in draws for l, h in d if l == 4} == {0, 1, 2, 3}


def test_a_full_layer_is_the_same_in_every_matched_draw():
    chosen = tuple((0, h) for h in range(4))
    assert {random_matched(chosen, n_heads=4, seed=s) for s in range(5)} == {chosen}


def test_depth_sets_keep_the_heads_per_depth_bin():
    assert depth_bins(12, 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert depth_bins(5, 2) == [[0, 1, 2], [3, 4]]
    chosen = ((0, 0), (0, 3), (1, 2), (4, 1), (9, 0), (11, 3))
    layers_seen = set()
    for seed in range(30):
        drawn = random_depth(chosen, n_layers=12, n_heads=4, seed=seed)
        bins = Counter(layer // 4 for layer, _ in drawn)
        assert bins == {0: 3, 1: 1, 2: 2} and len(set(drawn)) == 6
        layers_seen |= {layer for layer, _ in drawn}
    assert layers_seen == set(range(12)), "layers should move within their bins"
    assert random_control("depth", chosen, n_layers=12, n_heads=4, seed=7) == random_depth(
        chosen, n_layers=12, n_heads=4, seed=7
    )
    with pytest.raises(ValueError, match="unknown random control 'uniform'"):
        random_control("uniform", chosen, n_layers=12, n_heads=4, seed=0)


def test_overlap_is_the_shared_share():
    assert overlap([(0, 0), (0, 1), (2, 3), (4, 0)], [(0, 1), (4, 0), (5, 5)]) == 0.5
