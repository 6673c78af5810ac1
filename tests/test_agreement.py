"""Probe agreement: rank correlations between probes' head and layer rankings."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from scipy import stats

from probes.agreement import agreement, agreement_records


def probe_set(seed: int = 0) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    a = rng.random((6, 4))
    coords = {"layer": np.arange(6), "head": np.arange(4)}
    b = a.copy()
    b[5, 3] = np.nan  # a head one probe does not score
    return xr.Dataset(
        {
            "same": (("layer", "head"), a),
            "monotone": (("layer", "head"), np.exp(3 * a)),
            "reversed": (("layer", "head"), -a),
            "noisy": (("layer", "head"), a + rng.normal(0, 0.3, a.shape)),
            "gappy": (("layer", "head"), b),
        },
        coords=coords,
    )


def test_known_answers():
    result = agreement(probe_set())
    heads = result.sel(level="head")
    assert float(heads.spearman.sel(probe="same", other="monotone")) == pytest.approx(1.0)
    assert float(heads.kendall.sel(probe="same", other="monotone")) == pytest.approx(1.0)
    assert float(heads.spearman.sel(probe="same", other="reversed")) == pytest.approx(-1.0)
    assert float(heads.kendall.sel(probe="reversed", other="same")) == pytest.approx(-1.0)
    np.testing.assert_allclose(np.diag(heads.spearman.values), 1.0)
    assert (
        int(heads.n.sel(probe="same", other="gappy")) == 23
        and int(heads.n.sel(probe="same", other="noisy")) == 24
    )


def test_against_scipy_directly():
    ds = probe_set(seed=4)
    result = agreement(ds)
    a, b = ds.same.values.ravel(), ds.noisy.values.ravel()
    at = result.sel(level="head", probe="same", other="noisy")
    assert float(at.spearman) == pytest.approx(stats.spearmanr(a, b).statistic)
    assert float(at.kendall_p) == pytest.approx(stats.kendalltau(a, b).pvalue)
    # layers: each probe's mean over heads first; the gappy probe's layer 5 averages 3 heads
    la, lb = ds.same.mean("head").values, np.nanmean(ds.gappy.values, axis=1)
    layer = result.sel(level="layer", probe="same", other="gappy")
    assert float(layer.spearman) == pytest.approx(stats.spearmanr(la, lb).statistic)
    assert int(layer.n) == 6


def test_records_list_each_pair_once():
    records = agreement_records(agreement(probe_set()))
    assert len(records) == 10  # 5 probes, 10 unordered pairs
    assert {(r["probe"], r["other"]) for r in records} >= {("same", "reversed")}
    assert all(r["level"] == "head" for r in records)


def test_a_constant_probe_has_no_correlation():
    ds = probe_set().assign(flat=(("layer", "head"), np.ones((6, 4))))
    at = agreement(ds).sel(level="head", probe="same", other="flat")
    assert np.isnan(float(at.spearman)) and np.isnan(float(at.kendall))
    with pytest.raises(ValueError, match="at least two probes"):
        agreement(ds[["flat"]])


def test_a_per_layer_probe_joins_the_layer_level_only():
    ds = probe_set()
    per_layer = -ds.same.mean("head")  # a knockout-like score: layers only, the reverse ranking
    result = agreement(ds.assign(knockout=per_layer))
    heads = result.sel(level="head", probe="knockout")
    assert int(heads.n.sel(other="same")) == 0 and np.isnan(float(heads.spearman.sel(other="same")))
    layers = result.sel(level="layer", probe="knockout")
    assert (
        float(layers.spearman.sel(other="same")) == pytest.approx(-1.0)
        and int(layers.n.sel(other="same")) == 6
    )
