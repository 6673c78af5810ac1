"""Repeated-measures statistics of Head Impact (probes.statistics): Friedman tests with
samples (or images) as blocks, bootstrap intervals and top-K shares."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from scipy import stats

from mechhi.store import open_store
from probes.head_impact import score
from probes.statistics import bootstrap_layers, friedman, records, top_k_share


def iou_dataset(values: np.ndarray, images: list[str] | None = None) -> xr.Dataset:
    """A scored-store-like dataset from (S, L, H) IoU values."""
    s, l, h = values.shape
    coords = {"sample": np.arange(s), "layer": np.arange(l), "head": np.arange(h),
              "depth": ("layer", np.linspace(0, 1, l)),
              "image_id": ("sample", images or [f"i{k}" for k in range(s)])}  # fmt: skip
    return xr.Dataset({"iou": (("sample", "layer", "head"), values)}, coords=coords)


def planted(seed: int = 0, samples: int = 30, effect: float = 0.3) -> np.ndarray:
    """IoU where layer 2 is better for every sample and head 1 of layer 0 is better than its neighbours."""
    rng = np.random.default_rng(seed)
    values = rng.uniform(0.1, 0.4, size=(samples, 4, 3))
    values[:, 2] += effect
    values[:, 0, 1] += effect
    return values


def test_friedman_against_scipy_on_blocks_built_by_hand():
    values = planted()
    values[3, 1, 2] = np.nan  # a head without IoU for one sample: its layer mean uses the other heads
    values[7] = np.nan  # a sample never scored: dropped
    result = friedman(iou_dataset(values))
    blocks = np.array([[np.nanmean(values[s, l]) for l in range(4)] for s in range(30) if s != 7])
    expected = stats.friedmanchisquare(*blocks.T)
    layers = result.sel(test="layers")
    assert float(layers.statistic) == pytest.approx(expected.statistic)
    assert float(layers.p_value) == pytest.approx(expected.pvalue)
    assert int(layers.df) == 3 and int(layers.n_blocks) == 29
    assert float(layers.kendall_w) == pytest.approx(expected.statistic / (29 * 3))
    heads0 = result.sel(test="heads in layer 0")
    rows = [s for s in range(30) if s != 7]
    assert float(heads0.statistic) == pytest.approx(stats.friedmanchisquare(*values[rows, 0].T).statistic)
    assert int(result.sel(test="heads in layer 1").n_blocks) == 28, "the incomplete block of layer 1 is dropped"
    assert float(layers.p_value) < 1e-6 and float(heads0.p_value) < 1e-6
    assert float(result.sel(test="heads in layer 3").p_value) > 1e-3, "no planted difference among layer 3's heads"


def test_friedman_with_images_as_blocks_averages_an_images_samples():
    values = planted(samples=12)
    images = [f"i{k // 3}" for k in range(12)]  # three samples per image
    result = friedman(iou_dataset(values, images), unit="image")
    blocks = values.reshape(4, 3, 4, 3).mean(axis=(1, 3))  # (images, layers)
    assert float(result.sel(test="layers").statistic) == pytest.approx(stats.friedmanchisquare(*blocks.T).statistic)
    assert int(result.sel(test="layers").n_blocks) == 4


def test_bootstrap_interval_covers_the_mean_and_matches_a_slow_percentile_loop():
    values = planted(seed=2, samples=40)
    ds = iou_dataset(values)
    result = bootstrap_layers(ds, k=1, n_resamples=4000, unit="sample", method="percentile", seed=1)
    np.testing.assert_allclose(result.mean_hi.values, values.mean(axis=(0, 2)))
    assert np.all((result.ci_low < result.mean_hi) & (result.mean_hi < result.ci_high))
    rng = np.random.default_rng(5)  # an independent, slow percentile bootstrap
    draws = np.array([values[rng.integers(0, 40, 40)].mean(axis=(0, 2)) for _ in range(4000)])  # (B, L)
    np.testing.assert_allclose(result.ci_low.values, np.quantile(draws, 0.025, axis=0), atol=0.01)
    np.testing.assert_allclose(result.ci_high.values, np.quantile(draws, 0.975, axis=0), atol=0.01)
    assert result.top_k_share.sel(layer=2) == 1.0 and float(result.top_k_share.sum()) == pytest.approx(1.0)


def test_top_k_share_counts_by_hand():
    distribution = np.array([[3.0, 1.0, 2.0, np.nan], [2.0, 3.0, 2.0, 1.0], [1.0, 2.0, 2.0, 2.0]])  # (L, B)
    # resample 0: 0 > 1 > 2; 1: 1 > 2 > 0; 2: tie 0 = 1 = 2, layer order; 3: NaN last -> 2, 1
    np.testing.assert_allclose(top_k_share(distribution, 1), [2 / 4, 1 / 4, 1 / 4])
    np.testing.assert_allclose(top_k_share(distribution, 2), [2 / 4, 4 / 4, 2 / 4])


def test_on_a_real_store(multiview_store):
    path, _, _ = multiview_store
    ds = score(open_store(path)).assign_coords(image_id=("sample", ["a", "a", "b", "c", "c"]))
    result = friedman(ds, unit="sample")
    assert int(result.sel(test="layers").n_blocks) == 4  # sample 2 is not done
    shares = bootstrap_layers(ds, k=2, n_resamples=200, unit="image")
    assert shares.attrs["n_units"] == 2  # images a and c (b's only sample is not done)
    assert float(shares.top_k_share.sum()) == pytest.approx(2.0)
    rows = records(result, "test")
    assert rows[0]["test"] == "layers" and rows[0]["within_layer"] is None and rows[1]["within_layer"] == 0.0


def test_paper_table2_p_values_fit_the_next_models_degrees_of_freedom():
    """docs/statistics.md: Table 2's p-values are chi-square tails with the df of another model
    (PaliGemma2 26 layers x 8 heads, Qwen2-VL 28 x 12, SmolVLM 24 x 32), not their own."""
    own = {"PaliGemma2": (25, 7), "Qwen2-VL": (27, 11), "SmolVLM": (23, 31)}
    printed = {"PaliGemma2": (92.93, 3.62e-9, 12.94, 0.30), "Qwen2-VL": (103.56, 3.40e-12, 31.86, 0.42),
               "SmolVLM": (75.28, 6.15e-7, 6.81, 0.449)}  # fmt: skip
    rotated = {"PaliGemma2": "Qwen2-VL", "Qwen2-VL": "SmolVLM", "SmolVLM": "PaliGemma2"}
    for model, (h_layers, p_layers, h_heads, p_heads) in printed.items():
        other = own[rotated[model]]
        assert stats.chi2.sf(h_layers, other[0]) == pytest.approx(p_layers, rel=0.01)
        assert stats.chi2.sf(h_heads, other[1]) == pytest.approx(p_heads, abs=0.005)
    assert stats.chi2.sf(31.86, 11) == pytest.approx(0.0008, abs=0.0001)  # Qwen2-VL heads with its own df
