"""`mechhi stats` with the repeated-measures tests, and `mechhi rank --compare-probes`."""

from __future__ import annotations

import json

import pytest
from scipy import stats as scipy_stats
from typer.testing import CliRunner

from mechhi.cli import app
from mechhi.store import open_store
from tests.causal_fixtures import toy_model, toy_store  # noqa: F401  (fixtures)


def test_stats_json_has_friedman_bootstrap_and_the_papers_test(toy_store):  # noqa: F811
    result = CliRunner().invoke(app, ["stats", "--store", str(toy_store), "--n-resamples", "300", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert {t["test"] for t in payload["kruskal_wallis"]} >= {"iou across layers"}
    friedman = {t["test"]: t for t in payload["friedman"]}
    assert len(friedman) == 1 + 12 and friedman["layers"]["df"] == 11 and payload["friedman_blocks"] == "image"
    iou = open_store(toy_store).iou.astype("float64")  # (S, L, H): the layers test by hand, images as blocks
    by_image = iou.groupby("image_id").mean("sample").mean("head").transpose("image_id", "layer").values
    expected = scipy_stats.friedmanchisquare(*by_image.T)
    assert friedman["layers"]["n_blocks"] == len(by_image) < iou.sizes["sample"]
    assert friedman["layers"]["statistic"] == pytest.approx(expected.statistic, rel=1e-9)
    assert friedman["layers"]["p_value"] == pytest.approx(expected.pvalue, rel=1e-9, abs=0)
    assert friedman["layers"]["p_holm"] >= friedman["layers"]["p_value"]
    samples = CliRunner().invoke(app, ["stats", "--store", str(toy_store), "--n-resamples", "100",
                                       "--blocks", "samples", "--json"])  # fmt: skip
    by_sample = json.loads(samples.stdout)
    assert by_sample["friedman_blocks"] == "sample" and by_sample["friedman"][0]["n_blocks"] == iou.sizes["sample"]
    assert by_sample["friedman"][0]["statistic"] == pytest.approx(
        scipy_stats.friedmanchisquare(*iou.values.mean(2).T).statistic, rel=1e-9)
    boot = payload["bootstrap"]
    assert boot["unit"] == "image" and boot["k"] == 3 and len(boot["layers"]) == 12
    assert sum(r["top_k_share"] for r in boot["layers"]) == pytest.approx(3.0)
    assert all(r["ci_low"] <= r["mean_hi"] <= r["ci_high"] for r in boot["layers"])
    table = CliRunner().invoke(app, ["stats", "--store", str(toy_store), "--n-resamples", "200"])
    assert table.exit_code == 0 and "Friedman (images as blocks" in table.stdout
    assert "the paper's test" in table.stdout
    assert "Holm p" in table.stdout
    bad = CliRunner().invoke(app, ["stats", "--store", str(toy_store), "--resample", "pixel"])
    assert bad.exit_code == 1 and "--resample: unknown unit 'pixel'" in bad.output
    bad = CliRunner().invoke(app, ["stats", "--store", str(toy_store), "--blocks", "object"])
    assert bad.exit_code == 1 and "--blocks: unknown unit 'object'" in bad.output


def test_stats_prints_a_float64_p_where_float32_would_read_zero(toy_store, monkeypatch):  # noqa: F811
    """The store's iou is float32: the Kruskal-Wallis p across layers must be scipy's on float64
    values, printed as a number (not "< 1e-300"), and the --json must parse strictly."""
    import numpy as np
    import xarray as xr

    import mechhi.cli.score as score_cli

    real = score_cli.scored

    def shifted(ds: xr.Dataset) -> xr.Dataset:  # layers far apart: the float64 p lies below float32's range
        layers = xr.DataArray(np.linspace(0, 3, ds.sizes["layer"]), dims="layer")
        return ds.assign(iou=(ds.iou + layers).astype(np.float32))

    monkeypatch.setattr(score_cli, "scored", lambda *args, **kwargs: shifted(real(*args, **kwargs)))
    result = CliRunner().invoke(app, ["stats", "--store", str(toy_store), "--n-resamples", "100", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"JSON literal {c}"))
    iou = shifted(open_store(toy_store)).iou.transpose("sample", "layer", "head").values.astype(np.float64)
    expected = scipy_stats.kruskal(*[iou[:, l][np.isfinite(iou[:, l])] for l in range(iou.shape[1])]).pvalue
    assert 0 < expected < 1e-45
    kw = {t["test"]: t for t in payload["kruskal_wallis"]}["iou across layers"]
    assert kw["p_value"] == pytest.approx(expected, rel=1e-9, abs=0)
    table = CliRunner().invoke(app, ["stats", "--store", str(toy_store), "--n-resamples", "100"])
    assert f"{expected:.3g}" in table.stdout and "1e-300" not in table.stdout


def test_rank_compare_probes(toy_store):  # noqa: F811
    result = CliRunner().invoke(app, ["rank", "--store", str(toy_store), "--compare-probes", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    pairs = {(p["level"], p["probe"], p["other"]): p for p in payload["pairs"]}
    assert len(pairs) == 20  # 10 probe pairs (5 probes) x (head, layer)
    hi_mass = pairs[("head", "head_impact", "attention_mass")]
    assert hi_mass["n"] == 48 and -1.0 <= hi_mass["spearman"] <= 1.0 and -1.0 <= hi_mass["kendall"] <= 1.0
    table = CliRunner().invoke(app, ["rank", "--store", str(toy_store), "--compare-probes", "--device", "cpu"])
    assert table.exit_code == 0 and "Probe agreement on head rankings" in table.stdout
