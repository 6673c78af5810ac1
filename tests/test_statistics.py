"""Repeated-measures statistics of Head Impact (probes.statistics): Friedman tests with
images (or samples) as blocks, Holm's adjustment, bootstrap intervals and top-K shares."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from scipy import stats

from mechhi.store import open_store
from probes.head_impact import score
from probes.statistics import _friedman, bootstrap_layers, friedman, holm, p_text, records, top_k_share


def iou_dataset(values: np.ndarray, images: list[str] | None = None) -> xr.Dataset:
    """A scored-store-like dataset from (S, L, H) IoU values."""
    s, l, h = values.shape
    coords = {
        "sample": np.arange(s),
        "layer": np.arange(l),
        "head": np.arange(h),
        "depth": ("layer", np.linspace(0, 1, l)),
        "image_id": ("sample", images or [f"i{k}" for k in range(s)]),
    }
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
    result = friedman(iou_dataset(values), unit="sample")
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
    assert int(result.sel(test="heads in layer 1").n_blocks) == 28, (
        "the incomplete block of layer 1 is dropped"
    )
    assert float(layers.p_value) < 1e-6 and float(heads0.p_value) < 1e-6
    assert float(result.sel(test="heads in layer 3").p_value) > 1e-3, (
        "no planted difference among layer 3's heads"
    )


def test_friedman_takes_images_as_blocks_by_default_each_the_mean_of_its_samples():
    values = planted(samples=12)
    images = [f"i{k // 3}" for k in range(12)]  # three samples per image
    result = friedman(iou_dataset(values, images))
    assert result.attrs["blocks"] == "image"
    blocks = values.reshape(4, 3, 4, 3).mean(axis=(1, 3))  # (images, layers)
    expected = stats.friedmanchisquare(*blocks.T)
    layers = result.sel(test="layers")
    assert float(layers.statistic) == pytest.approx(expected.statistic)
    assert float(layers.p_value) == pytest.approx(expected.pvalue)
    assert int(layers.n_blocks) == 4 and float(layers.kendall_w) == pytest.approx(
        expected.statistic / (4 * 3)
    )
    heads0 = values[:, 0].reshape(4, 3, 3).mean(1)  # (images, heads) of layer 0
    assert float(result.sel(test="heads in layer 0").statistic) == pytest.approx(
        stats.friedmanchisquare(*heads0.T).statistic
    )
    by_sample = friedman(iou_dataset(values, images), unit="sample")
    assert by_sample.attrs["blocks"] == "sample" and int(by_sample.sel(test="layers").n_blocks) == 12


def test_friedman_p_is_float64_for_float32_blocks():
    """scipy returns a float32 p for float32 input, 0.0 below 1e-45; the store's iou is float32."""
    rng = np.random.default_rng(1)
    blocks = (rng.uniform(0, 1, size=(200, 6)) + np.linspace(0, 0.6, 6)).astype(np.float32)
    expected = stats.friedmanchisquare(*blocks.astype(np.float64).T).pvalue
    assert 0 < expected < 1e-50  # below float32's range (1e-45)
    statistic, df, p, n, w = _friedman(blocks)
    assert p == pytest.approx(expected, rel=1e-9, abs=0) and df == 5 and n == 200
    result = friedman(iou_dataset(np.repeat(blocks[:, :, None], 2, axis=2)), unit="sample")
    assert float(result.sel(test="layers").p_value) == pytest.approx(expected, rel=1e-9, abs=0)


def test_holm_against_a_hand_computed_case():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06 (non-decreasing)
    np.testing.assert_allclose(holm(np.array([0.01, 0.04, 0.03, 0.005])), [0.03, 0.06, 0.06, 0.02])
    # NaN: not a test, m = 5: 0.005 x 5, 0.01 x 4, 0.03 x 3 = 0.09, 0.04 x 2 = 0.08 -> 0.09, 0.6 x 1
    adjusted = holm(np.array([0.01, np.nan, 0.04, 0.03, 0.005, 0.6]))
    np.testing.assert_allclose(adjusted, [0.04, np.nan, 0.09, 0.09, 0.025, 0.6])
    np.testing.assert_allclose(holm(np.array([0.5, 0.9])), [1.0, 1.0])  # capped at 1
    assert holm(np.array([])).shape == (0,)


def test_friedman_reports_holm_over_all_its_tests():
    result = friedman(iou_dataset(planted()), unit="sample")
    raw = result.p_value.values
    assert result.sizes["test"] == 5
    order = np.argsort(raw)
    expected = np.minimum(np.maximum.accumulate(raw[order] * np.arange(5, 0, -1)), 1.0)
    np.testing.assert_allclose(result.p_holm.values[order], expected, rtol=1e-12, atol=0)
    assert np.all(result.p_holm.values >= raw)


def test_p_text_prints_the_float64_value_and_names_only_a_true_underflow():
    assert p_text(1.3825e-89) == "1.38e-89"
    assert p_text(0.0) == "< 5e-324"  # below the smallest float64: not a zero
    assert p_text(stats.chi2.sf(2000.0, 11)) == "< 5e-324" and stats.chi2.sf(1000.0, 11) > 0
    assert p_text(None) == "n/a" and p_text(float("nan")) == "n/a" and p_text(0.0958) == "0.0958"


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


def test_paper_table2_has_two_readings_that_the_table_cannot_decide():
    """docs/statistics.md: Table 2's (H, p) pairs are not chi-square tails with the df of the
    column's own model (Table 1: PaliGemma2 26 layers x 8 heads, Qwen2-VL 28 x 12, SmolVLM
    24 x 32). Either the p-values used another model's df (then Qwen2-VL's heads differ,
    p = 0.0008), or the model labels of the columns are rotated (then every p is right and no
    heads test is significant)."""
    from scipy import optimize

    own = {"PaliGemma2": (25, 7), "Qwen2-VL": (27, 11), "SmolVLM": (23, 31)}
    printed = {
        "PaliGemma2": ((92.93, 3.62e-9), (12.94, 0.30)),
        "Qwen2-VL": ((103.56, 3.40e-12), (31.86, 0.42)),
        "SmolVLM": ((75.28, 6.15e-7), (6.81, 0.449)),
    }

    def fitted_df(h: float, p: float) -> float:  # the df whose chi-square tail at H is the printed p
        return optimize.brentq(lambda df: stats.chi2.logsf(h, df) - np.log(p), 1, 100)

    fitted = [fitted_df(h, p) for tests in printed.values() for h, p in tests]
    np.testing.assert_allclose(fitted, [27, 11.04, 23, 30.93, 25, 7], atol=0.01)
    # reading 1, columns labelled right: p from each model's own df; Qwen2-VL's heads pass p < 0.001
    from_own = {m: [stats.chi2.sf(h, df) for (h, _), df in zip(printed[m], own[m])] for m in printed}
    assert from_own["Qwen2-VL"][1] == pytest.approx(0.0008, abs=0.0001)
    assert from_own["PaliGemma2"][1] == pytest.approx(0.074, abs=0.001) and from_own["SmolVLM"][1] > 0.99
    assert all(layers < 1e-6 for layers, _ in from_own.values())
    # reading 2, labels rotated: each column is the next model's, and every printed p follows from its H
    actual = {"PaliGemma2": "Qwen2-VL", "Qwen2-VL": "SmolVLM", "SmolVLM": "PaliGemma2"}
    for label, tests in printed.items():
        for (h, p), df in zip(tests, own[actual[label]]):
            assert stats.chi2.sf(h, df) == pytest.approx(p, rel=0.01, abs=0.005 if p > 0.01 else 0)
    assert all(p > 0.001 for _, (_, p) in printed.values())  # under it no heads test is significant
