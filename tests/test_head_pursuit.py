"""Head Pursuit: SOMP against known supports and an independent least-squares projection."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from probes.head_pursuit import head_ranking, pursue_heads, somp


def _projection_explained(x: np.ndarray, atoms: np.ndarray) -> float:
    """Explained variance of centred x by the span of atoms, via the pseudo-inverse."""
    x = x - x.mean(0)
    projected = x @ np.linalg.pinv(atoms) @ atoms
    return 1 - ((x - projected) ** 2).sum() / (x**2).sum()


def test_somp_recovers_a_planted_support():
    rng = np.random.default_rng(0)
    dictionary = rng.normal(size=(30, 16)) * rng.uniform(0.5, 3.0, size=(30, 1))  # atoms of unequal norm
    planted = [3, 11, 27]
    weights = rng.normal(size=(40, 3)) * [5.0, 2.0, 1.0]
    signal = weights @ dictionary[planted] + 7.0  # an offset that centring must remove
    result = somp(signal, dictionary, k=3)
    assert sorted(result.support.tolist()) == planted
    assert result.support[0] == 3  # the heaviest atom is found first
    assert result.explained[-1] == pytest.approx(1.0, abs=1e-10)
    assert np.all(np.diff(result.explained) >= -1e-12)
    assert result.ranked_atoms()[0] == 3


def test_somp_explained_variance_is_the_projection_on_its_support():
    rng = np.random.default_rng(1)
    dictionary = rng.normal(size=(12, 10))
    signal = rng.normal(size=(25, 10))  # not in any small span
    result = somp(signal, dictionary, k=4)
    for step in range(1, 5):
        expected = _projection_explained(signal, dictionary[result.support[:step]])
        assert result.explained[step - 1] == pytest.approx(expected, abs=1e-10)
    # the first atom is the one with the largest summed |correlation| with the centred signal
    centred = signal - signal.mean(0)
    unit = dictionary / np.linalg.norm(dictionary, axis=1, keepdims=True)
    assert result.support[0] == int(np.argmax(np.abs(unit @ centred.T).sum(1)))
    assert len(set(result.support.tolist())) == 4


def test_somp_rejects_bad_input():
    with pytest.raises(ValueError, match="must be"):
        somp(np.zeros((3, 4)), np.ones((5, 3)), k=1)
    with pytest.raises(ValueError, match="k=6"):
        somp(np.zeros((3, 4)), np.ones((5, 4)), k=6)
    with pytest.raises(ValueError, match="all-zero atom"):
        somp(np.ones((3, 4)), np.zeros((5, 4)), k=1)


def test_pursue_heads_labels_every_head_and_ranks_them():
    rng = np.random.default_rng(2)
    words = ["red", "green", "blue", "circle", "square", "star"]
    dictionary = rng.normal(size=(6, 8))
    values = rng.normal(size=(20, 2, 3, 8)) * 0.01  # noise everywhere ...
    values[:, 1, 2] += rng.normal(size=(20, 1)) * dictionary[1]  # ... but head (1, 2) writes "green"
    signals = xr.DataArray(
        values,
        dims=("sample", "layer", "head", "hidden"),
        coords={"layer": [0, 1], "head": [0, 1, 2], "depth": ("layer", [0.0, 1.0])},
    )
    result = pursue_heads(signals, dictionary, words, k=2)
    assert result.explained.dims == ("layer", "head") and result.explained_curve.sizes["step"] == 2
    assert str(result.top_word.sel(layer=1, head=2).values) == "green"
    assert float(result.explained.sel(layer=1, head=2)) > 0.99
    # the chance reference: as many random directions explain far less of the planted head,
    # and about as much of a noise head as the concept does
    assert (
        float(result.explained_random.sel(layer=1, head=2)) < 0.7
    )  # 10 draws: best 2 of 6 random atoms in 8-D
    noise = result.sel(layer=0, head=0)
    assert (
        0.05 < float(noise.explained_random) < 0.6
        and abs(float(noise.explained - noise.explained_random)) < 0.3
    )
    again = pursue_heads(signals, dictionary, words, k=2)
    np.testing.assert_array_equal(again.explained_random.values, result.explained_random.values)  # seeded
    ranking = head_ranking(result)
    assert (int(ranking["layer"][0]), int(ranking["head"][0])) == (1, 2)
    assert np.all(np.diff(ranking.values) <= 0)
    with pytest.raises(ValueError, match="5 words for 6 atoms"):
        pursue_heads(signals, dictionary, words[:5], k=2)


def test_vocabulary_row_controls_are_drawn_without_the_concept_and_summarised_by_median_and_iqr():
    from probes.head_pursuit import random_rows

    rng = np.random.default_rng(5)
    vocabulary = rng.normal(size=(40, 8))
    draws = random_rows(vocabulary, 4, 12, seed=3, exclude=[0, 1, 2, 3])
    assert draws.shape == (12, 4, 8)
    rows = {int(np.flatnonzero((vocabulary == row).all(1))[0]) for draw in draws for row in draw}
    assert rows.isdisjoint({0, 1, 2, 3}) and len(rows) > 4
    assert all(len({tuple(r) for r in draw}) == 4 for draw in draws)  # without replacement within a draw
    np.testing.assert_array_equal(
        random_rows(vocabulary, 4, 12, seed=3, exclude=[0, 1, 2, 3]), draws
    )  # seeded
    with pytest.raises(ValueError, match="2 rows to draw 4 from"):
        random_rows(vocabulary[:6], 4, 1, exclude=[0, 1, 2, 3])

    words = ["a", "b", "c", "d"]
    values = rng.normal(size=(15, 1, 2, 8)) * 0.01
    values[:, 0, 1] += rng.normal(size=(15, 1)) * vocabulary[2]  # head 1 writes concept word "c"
    signals = xr.DataArray(
        values, dims=("sample", "layer", "head", "hidden"), coords={"layer": [0], "head": [0, 1]}
    )
    result = pursue_heads(signals, vocabulary[:4], words, k=2, controls=draws)
    per_draw = np.array([somp(values[:, 0, 1], d, 2).explained[-1] for d in draws])  # by hand, draw by draw
    at = result.sel(layer=0, head=1)
    assert float(at.explained_random) == pytest.approx(np.median(per_draw))
    assert float(at.explained_random_q25) == pytest.approx(np.percentile(per_draw, 25))
    assert float(at.explained_random_q75) == pytest.approx(np.percentile(per_draw, 75))
    assert float(at.explained) > 0.99 > float(at.explained_random_q75)
    assert result.attrs["control"] == "vocabulary rows" and result.sizes["draw"] == 12
    none = pursue_heads(signals, vocabulary[:4], words, k=2, control_draws=0)
    assert np.isnan(none.explained_random.values).all() and none.sizes["draw"] == 0


def test_ranking_by_excess_over_the_control_puts_the_concept_head_above_a_low_rank_one():
    ds = xr.Dataset(
        {
            "explained": (("layer", "head"), [[0.6, 0.3]]),
            "explained_random": (("layer", "head"), [[0.58, 0.05]]),
        },
        coords={"layer": [0], "head": [0, 1]},
    )
    assert int(head_ranking(ds)["head"][0]) == 0  # most explained: the low-rank head any rows explain
    excess = head_ranking(ds, by="excess")
    assert int(excess["head"][0]) == 1 and float(excess[0]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="--rank-by 'best'"):
        head_ranking(ds, by="best")
