"""Head Impact: kernels against hand-computed numbers, score() against a slow loop,
Kruskal-Wallis against scipy on groups built here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from scipy import stats

from mechhi.store import SampleMeta, create_store, open_store, write_batch
from probes.head_impact import (
    BinarizeRule,
    binarize_attention,
    binarize_mask,
    head_impact_from_iou,
    iou,
    kruskal_records,
    kruskal_wallis,
    layer_ranking,
    sample_iou,
    score,
    score_store,
)
from tests.conftest import GRIDS, H, L

nan = np.nan


# ---------------------------------------------------------------- hand-computed kernels
def test_single_view_iou_by_hand():
    # Own grid 2x2, padded to 2x3 (column 2 is outside the grid).
    # Mask: coverage >= 0.5 at (0,0) and (1,0).
    coverage = np.array([[0.9, 0.2, nan], [0.6, 0.0, nan]])
    attention = np.array(
        [
            [
                # head 0: mean of the 4 valid = 0.25 -> A = {(0,0), (1,0)} = M -> IoU 1
                [[0.4, 0.1, nan], [0.3, 0.2, nan]],
                # head 1: A = {(0,1), (1,1)}, disjoint from M -> 0/4 = 0
                [[0.1, 0.5, nan], [0.1, 0.3, nan]],
                # head 2: A = {(0,0)}; the 9.0 sits outside the grid and must be ignored
                # (if counted, the mean would be 2.0 and A empty) -> 1/2
                [[0.7, 0.1, 9.0], [0.1, 0.1, nan]],
            ]
        ]
    )  # (L=1, H=3, 2, 3)
    got = sample_iou({"image": attention}, {"image": coverage})
    np.testing.assert_allclose(got, [[1.0, 0.0, 0.5]])


def test_empty_union_is_nan():
    coverage = np.zeros((2, 2))  # object covers nothing: no mask token, nothing to keep
    attention = np.array([[[[0.25, 0.25], [0.25, 0.25]], [[0.4, 0.2], [0.2, 0.2]]]])  # (1, 2, 2, 2)
    # head 0: uniform, no score > mean -> A empty, M empty -> NaN
    # head 1: A = {(0,0)}, M empty -> 0/1 = 0
    got = sample_iou({"image": attention}, {"image": coverage})
    np.testing.assert_array_equal(got, [[nan, 0.0]])
    assert np.isnan(iou(np.zeros(3, bool), np.zeros(3, bool)))


def test_small_object_keeps_best_tokens():
    coverage = np.array([[0.3, 0.1], [0.3, 0.0]])  # nothing reaches 0.5; best 0.3 ties at (0,0), (1,0)
    attention = np.array([[[[0.5, 0.1], [0.1, 0.1]]]])  # mean 0.2 -> A = {(0,0)}
    keep = sample_iou({"image": attention}, {"image": coverage})  # M = {(0,0), (1,0)} -> 1/2
    drop = sample_iou(
        {"image": attention}, {"image": coverage}, BinarizeRule(keep_best_token=False)
    )  # M empty -> 0/1
    np.testing.assert_allclose(keep, [[0.5]])
    np.testing.assert_allclose(drop, [[0.0]])
    np.testing.assert_array_equal(binarize_mask(np.array([0.3, 0.1, 0.3, nan])), [True, False, True, False])
    # Once any token reaches the threshold, best-token claiming does not apply.
    np.testing.assert_array_equal(binarize_mask(np.array([0.5, 0.4, nan])), [True, False, False])


def test_binarize_attention_ignores_invalid_and_rejects_nan_inside():
    np.testing.assert_array_equal(
        binarize_attention(np.array([1.0, 3.0, 100.0]), np.array([True, True, False])), [False, True, False]
    )
    with pytest.raises(ValueError, match="NaN attention"):
        sample_iou({"image": np.full((1, 1, 1, 2), nan)}, {"image": np.array([[0.5, 0.5]])})


def test_multi_view_iou_by_hand():
    # Pooled over views: tokens i0 i1 i2 | g0 g1.
    coverage = {"image": np.array([[0.8, 0.6, 0.0]]), "global": np.array([[0.7, 0.0]])}  # M = {i0, i1, g0}
    attention = {
        # head 0: pooled mean = (0.10+0.02+0.03+0.50+0.30)/5 = 0.19 -> A = {g0, g1};
        # inter {g0} = 1, union {i0, i1, g0, g1} = 4 -> 0.25.
        # (Per-view means would give A = {i0, g0} and IoU 2/3: pooling matters.)
        "image": np.array([[[[0.10, 0.02, 0.03]]]]),
        "global": np.array([[[[0.50, 0.30]]]]),
    }
    np.testing.assert_allclose(sample_iou(attention, coverage), [[0.25]])

    # Keep-best is decided over all views together: the best token is g0 (0.4), not i0.
    small = {"image": np.array([[0.3, 0.0]]), "global": np.array([[0.4, 0.1]])}  # M = {g0}
    att = {"image": np.array([[[[0.1, 0.1]]]]), "global": np.array([[[[0.6, 0.2]]]])}  # mean 0.25 -> A = {g0}
    np.testing.assert_allclose(sample_iou(att, small), [[1.0]])  # per-view claiming would give 1/2


def test_head_impact_skips_nan_samples():
    values = np.array(
        [
            [[1.0, nan, nan]],
            [[0.5, 0.2, nan]],
            [[nan, 0.4, nan]],
        ]
    )  # (sample=3, layer=1, head=3)
    coords = {"sample": [0, 1, 2], "layer": [0], "head": [0, 1, 2]}
    got = head_impact_from_iou(xr.DataArray(values, dims=("sample", "layer", "head"), coords=coords))
    expected = xr.DataArray(
        [[0.75, 0.3, nan]],
        dims=("layer", "head"),
        coords={"layer": [0], "head": [0, 1, 2]},
        name="head_impact",
    )
    xr.testing.assert_allclose(got, expected)


def test_rule_validation_and_record():
    assert BinarizeRule().to_dict() == {"attention": "mean", "mask_threshold": 0.5, "keep_best_token": True}
    assert BinarizeRule.from_dict(BinarizeRule(mask_threshold=0.3).to_dict()) == BinarizeRule(
        mask_threshold=0.3
    )
    assert "0.5" in BinarizeRule().describe()
    with pytest.raises(ValueError, match="mask_threshold"):
        BinarizeRule(mask_threshold=0.0)
    with pytest.raises(ValueError, match="'median': choose from mean, mean-without-sinks"):
        BinarizeRule(attention="median")


# ---------------------------------------------------------------- statistics
def hi_dataset(seed: int = 0) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    values = rng.random((6, 3, 4))  # (sample, layer, head)
    values[rng.random(values.shape) < 0.2] = nan
    iou_da = xr.DataArray(
        values, dims=("sample", "layer", "head"), coords={"layer": [0, 1, 2], "head": [0, 1, 2, 3]}
    )
    return xr.Dataset({"iou": iou_da, "head_impact": head_impact_from_iou(iou_da)})


def test_kruskal_wallis_matches_scipy():
    ds = hi_dataset()
    iou_v = ds["iou"].values  # (sample, layer, head), built above in this order
    S, L, H = iou_v.shape
    hi = np.nanmean(iou_v, axis=0)  # (L, H)

    def finite(xs):
        return [x for x in xs if not np.isnan(x)]

    layer_hi = [finite([hi[l, h] for h in range(H)]) for l in range(L)]
    head_hi = [finite([hi[l, h] for l in range(L)]) for h in range(H)]
    layer_iou = [finite([iou_v[s, l, h] for s in range(S) for h in range(H)]) for l in range(L)]
    head_iou = [finite([iou_v[s, l, h] for s in range(S) for l in range(L)]) for h in range(H)]

    got = kruskal_wallis(ds)
    for label, groups in [
        ("head_impact across layers", layer_hi),
        ("head_impact across heads", head_hi),
        ("iou across layers", layer_iou),
        ("iou across heads", head_iou),
    ]:
        ref = stats.kruskal(*groups)
        row = got.sel(test=label)
        np.testing.assert_allclose(float(row["statistic"]), ref.statistic)
        np.testing.assert_allclose(float(row["p_value"]), ref.pvalue)
        assert int(row["df"]) == len(groups) - 1
    records = kruskal_records(got)
    assert [r["test"] for r in records] == list(got["test"].values)
    assert set(records[0]) == {"test", "across", "on", "statistic", "df", "p_value", "p_holm", "n_values"}


def test_kruskal_wallis_p_is_float64_on_a_float32_store():
    """A store keeps iou as float32; scipy then returns a float32 p, 0.0 below 1e-45 (the toy
    store printed "< 1e-300" for a p of 1.4e-89). The p must be scipy's on float64 values."""
    rng = np.random.default_rng(3)
    values = (rng.uniform(0, 1, size=(80, 6, 4)) + np.linspace(0, 0.4, 6)[None, :, None]).astype(np.float32)
    coords = {"layer": np.arange(6), "head": np.arange(4)}
    iou_da = xr.DataArray(values, dims=("sample", "layer", "head"), coords=coords)
    ds = xr.Dataset({"iou": iou_da, "head_impact": head_impact_from_iou(iou_da)})
    expected = stats.kruskal(*[values[:, l, :].ravel().astype(np.float64) for l in range(6)])
    assert 0 < expected.pvalue < 1e-50  # below float32's range
    row = kruskal_wallis(ds).sel(test="iou across layers")
    assert float(row["p_value"]) == pytest.approx(expected.pvalue, rel=1e-9, abs=0)
    assert float(row["statistic"]) == pytest.approx(expected.statistic, rel=1e-9)


def test_kruskal_wallis_holm_adjusts_the_four_tests_together():
    got = kruskal_wallis(hi_dataset(seed=4))
    raw = got["p_value"].values
    order = np.argsort(raw)  # Holm by hand: i-th smallest x (4 - i), running maximum, at most 1
    expected = np.minimum(np.maximum.accumulate(raw[order] * np.array([4, 3, 2, 1])), 1.0)
    np.testing.assert_allclose(got["p_holm"].values[order], expected)


def test_layer_ranking_sorted_with_rank_and_depth():
    hi = xr.DataArray(
        [[0.1, 0.3], [0.5, 0.7], [nan, nan], [0.2, 0.2]],
        dims=("layer", "head"),
        coords={"layer": [0, 1, 2, 3], "depth": ("layer", [0.0, 1 / 3, 2 / 3, 1.0])},
    )
    got = layer_ranking(xr.Dataset({"head_impact": hi}))
    expected = xr.DataArray(
        [0.6, 0.2, 0.2, nan],
        dims="layer",
        coords={
            "layer": [1, 0, 3, 2],
            "depth": ("layer", [1 / 3, 0.0, 1.0, 2 / 3]),
            "rank": ("layer", [1, 2, 3, 4]),
        },
        name="mean_head_impact",
    )
    xr.testing.assert_allclose(got, expected)


# ---------------------------------------------------------------- score() on a store
def slow_iou(att: dict, cov: dict, s: int, rule: BinarizeRule) -> np.ndarray:
    """One sample, plain loops over the sample's own tokens of every view."""
    tokens = [(v, r, c) for v, g in GRIDS[s].items() for r in range(g[0]) for c in range(g[1])]
    covs = [cov[(s, v)][r, c] for v, r, c in tokens]
    mask = [x >= rule.mask_threshold for x in covs]
    if rule.keep_best_token and not any(mask) and max(covs) > 0:
        mask = [x == max(covs) for x in covs]
    out = np.zeros((L, H))
    for l in range(L):
        for h in range(H):
            scores = [att[(s, v)][l, h, r, c] for v, r, c in tokens]
            mean = sum(scores) / len(scores)
            a = [x > mean for x in scores]
            inter = sum(x and y for x, y in zip(a, mask))
            union = sum(x or y for x, y in zip(a, mask))
            out[l, h] = inter / union if union else nan
    return out


@pytest.mark.parametrize("rule", [BinarizeRule(), BinarizeRule(mask_threshold=0.3, keep_best_token=False)])
def test_score_matches_slow_loop(multiview_store, rule, monkeypatch):
    path, att, cov = multiview_store
    # Store values are float32: feed the slow loop the same numbers.
    att = {k: v.astype(np.float32).astype(np.float64) for k, v in att.items()}
    cov = {k: v.astype(np.float32).astype(np.float64) for k, v in cov.items()}
    monkeypatch.setattr("probes.maps.BLOCK_BYTES", 1)  # force one sample per block
    got = score(open_store(path), rule)
    rows = [slow_iou(att, cov, s, rule) if s != 2 else np.full((L, H), nan) for s in range(len(GRIDS))]
    expected_iou = xr.DataArray(
        np.stack(rows),
        dims=("sample", "layer", "head"),
        coords={"sample": range(5), "layer": range(L), "head": range(H), "depth": ("layer", [0.0, 0.5, 1.0])},
        name="iou",
    )
    xr.testing.assert_allclose(got["iou"], expected_iou)
    expected_hi = np.nanmean(np.stack(rows), axis=0)
    np.testing.assert_allclose(got["head_impact"].transpose("layer", "head").values, expected_hi)
    assert got.attrs["binarize"] == rule.to_dict()


def test_score_store_writes_back(multiview_store):
    path, _, _ = multiview_store
    scores = score_store(path, BinarizeRule(mask_threshold=0.3))
    ds = open_store(path)
    xr.testing.assert_allclose(ds["head_impact"].compute(), scores["head_impact"])
    np.testing.assert_allclose(ds["iou"].values, scores["iou"].values, rtol=1e-6)  # stored as float32
    assert ds.attrs["binarize"] == BinarizeRule(mask_threshold=0.3).to_dict()
    assert layer_ranking(ds).sizes["layer"] == L


def test_score_no_maps_store_uses_traced_iou(tmp_path: Path):
    path = tmp_path / "n.zarr"
    samples = [SampleMeta("i", "o", f"d{s}", {"image": (1, 2)}) for s in range(3)]
    attrs = {
        "model": "m",
        "model_revision": "r",
        "dtype": "float32",
        "prompt_template": "p",
        "dataset": "d",
        "binarize": BinarizeRule().to_dict(),
    }
    create_store(path, samples=samples, n_layers=1, n_heads=2, attrs=attrs, maps=False)
    mask = {"image": np.zeros((2, 1, 2))}
    write_batch(path, [0, 2], attention=None, mask=mask, iou=np.array([[[0.2, nan]], [[0.4, 0.6]]]))
    scores = score_store(path)
    np.testing.assert_allclose(scores["head_impact"].values, [[0.3, 0.6]])
    assert np.isnan(scores["iou"].sel(sample=1)).all()
    with pytest.raises(ValueError, match="cannot rescore"):
        score(open_store(path), BinarizeRule(mask_threshold=0.3))
