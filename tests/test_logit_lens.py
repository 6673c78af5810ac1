"""The logit-lens probe: direct logits of each head's write on a concept's words, and SOMP's
first step in closed form (checked against probes.head_pursuit's own pursuit)."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from probes.head_pursuit import head_ranking, pursue_heads, somp
from probes.logit_lens import logit_lens

WORDS = ["red", "green", "blue", "yellow", "purple"]


def signals_and_dictionary(
    seed: int = 0, samples: int = 9, layers: int = 3, heads: int = 4, hidden: int = 12
):
    """Random writes; some heads write one word's direction with a sample-varying weight."""
    rng = np.random.default_rng(seed)
    dictionary = rng.normal(size=(len(WORDS), hidden)) * rng.uniform(0.5, 3.0, size=(len(WORDS), 1))
    x = rng.normal(size=(samples, layers, heads, hidden))
    for (layer, head), word, strength in (((0, 1), 2, 8.0), ((2, 3), 0, 6.0), ((1, 0), 4, 1.0)):
        x[:, layer, head] += (
            rng.normal(size=(samples, 1)) * strength * dictionary[word] / np.linalg.norm(dictionary[word])
        )
    da = xr.DataArray(
        x,
        dims=("sample", "layer", "head", "hidden"),
        coords={
            "sample": np.arange(samples),
            "layer": np.arange(layers),
            "head": np.arange(heads),
            "depth": ("layer", np.linspace(0, 1, layers)),
        },
    )
    return da, dictionary


def test_logits_and_mean_logit_against_a_loop():
    signals, dictionary = signals_and_dictionary()
    lens = logit_lens(signals, dictionary, WORDS)
    x = signals.values
    for s, l, h in [(0, 0, 1), (4, 2, 3), (8, 1, 0)]:
        for w in range(len(WORDS)):
            assert float(lens.logit.sel(sample=s, layer=l, head=h, word=WORDS[w])) == pytest.approx(
                float(sum(dictionary[w, i] * x[s, l, h, i] for i in range(x.shape[-1]))), rel=1e-12
            )
    by_hand = np.array(
        [
            [
                np.mean([dictionary[w] @ x[s, l, h] for s in range(x.shape[0]) for w in range(len(WORDS))])
                for h in range(x.shape[2])
            ]
            for l in range(x.shape[1])
        ]
    )
    np.testing.assert_allclose(lens.mean_logit.values, by_hand, rtol=1e-12)
    assert lens.mean_logit.dims == ("layer", "head") and "depth" in lens.coords


def test_one_step_is_somps_first_step():
    """Same top atom and the same explained variance, hence the same head ranking, as SOMP with k = 1."""
    signals, dictionary = signals_and_dictionary(seed=3)
    lens = logit_lens(signals, dictionary, WORDS)
    pursuit = pursue_heads(signals, dictionary, WORDS, k=1)
    np.testing.assert_array_equal(lens.top_word.values, pursuit.top_word.values)
    np.testing.assert_allclose(lens.explained.values, pursuit.explained.values, rtol=1e-9)
    lens_order = head_ranking(lens)  # heads by their explained share, best first
    pursuit_order = head_ranking(pursuit)
    assert list(lens_order.unit.values) == list(pursuit_order.unit.values)
    # the planted heads: their word is found, and they top the ranking
    assert str(lens.top_word.sel(layer=0, head=1).values) == "blue"
    assert str(lens.top_word.sel(layer=2, head=3).values) == "red"
    assert {tuple(u) for u in lens_order.unit.values[:2]} == {(0, 1), (2, 3)}
    # and somp on one head directly (not through pursue_heads)
    direct = somp(signals.sel(layer=1, head=0).values, dictionary, k=1)
    assert WORDS[int(direct.support[0])] == str(lens.top_word.sel(layer=1, head=0).values)


def test_bad_dictionaries_are_refused():
    signals, dictionary = signals_and_dictionary()
    with pytest.raises(ValueError, match="5 words for a dictionary of shape"):
        logit_lens(signals, dictionary[:4], WORDS)
    dictionary[1] = 0.0
    with pytest.raises(ValueError, match="all-zero row"):
        logit_lens(signals, dictionary, WORDS)
