"""`mechhi stats` with the repeated-measures tests, and `mechhi rank --compare-probes`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as scipy_stats
from typer.testing import CliRunner

from mechhi.commands import app
from mechhi.store import open_store
from tests.helpers import invoke_json


def test_stats_json_has_friedman_bootstrap_and_the_papers_test(toy_store):
    result = CliRunner().invoke(app, ["stats", "--store", str(toy_store), "--n-resamples", "300", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert {t["test"] for t in payload["kruskal_wallis"]} >= {"iou across layers"}
    friedman = {t["test"]: t for t in payload["friedman"]}
    assert (
        len(friedman) == 1 + 12 and friedman["layers"]["df"] == 11 and payload["friedman_blocks"] == "image"
    )
    iou = open_store(toy_store).iou.astype("float64")  # (S, L, H): the layers test by hand, images as blocks
    by_image = iou.groupby("image_id").mean("sample").mean("head").transpose("image_id", "layer").values
    expected = scipy_stats.friedmanchisquare(*by_image.T)
    assert friedman["layers"]["n_blocks"] == len(by_image) < iou.sizes["sample"]
    assert friedman["layers"]["statistic"] == pytest.approx(expected.statistic, rel=1e-9)
    assert friedman["layers"]["p_value"] == pytest.approx(expected.pvalue, rel=1e-9, abs=0)
    assert friedman["layers"]["p_holm"] >= friedman["layers"]["p_value"]
    samples = CliRunner().invoke(
        app, ["stats", "--store", str(toy_store), "--n-resamples", "100", "--blocks", "samples", "--json"]
    )
    by_sample = json.loads(samples.stdout)
    assert (
        by_sample["friedman_blocks"] == "sample"
        and by_sample["friedman"][0]["n_blocks"] == iou.sizes["sample"]
    )
    assert by_sample["friedman"][0]["statistic"] == pytest.approx(
        scipy_stats.friedmanchisquare(*iou.values.mean(2).T).statistic, rel=1e-9
    )
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


def test_stats_prints_a_float64_p_where_float32_would_read_zero(toy_store, monkeypatch):
    """The store's iou is float32: the Kruskal-Wallis p across layers must be scipy's on float64
    values, printed as a number (not "< 1e-300"), and the --json must parse strictly."""
    import numpy as np
    import xarray as xr

    import mechhi.commands.score as score_cli

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


def test_rank_compare_probes(toy_store):
    result = CliRunner().invoke(
        app, ["rank", "--store", str(toy_store), "--compare-probes", "--device", "cpu", "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    pairs = {(p["level"], p["probe"], p["other"]): p for p in payload["pairs"]}
    assert len(pairs) == 20  # 10 probe pairs (5 probes) x (head, layer)
    hi_mass = pairs[("head", "head_impact", "attention_mass")]
    assert hi_mass["n"] == 48 and -1.0 <= hi_mass["spearman"] <= 1.0 and -1.0 <= hi_mass["kendall"] <= 1.0
    table = CliRunner().invoke(
        app, ["rank", "--store", str(toy_store), "--compare-probes", "--device", "cpu"]
    )
    assert table.exit_code == 0 and "Probe agreement on head rankings" in table.stdout


def _piped(*args: str) -> subprocess.CompletedProcess:
    """``python -m mechhi args...`` with stdout a pipe (as under `> out.txt` or `| less`),
    in a terminal 50 columns wide (COLUMNS): the width rich fitted tables to before."""
    env = {**os.environ, "COLUMNS": "50"}
    return subprocess.run(
        [sys.executable, "-m", "mechhi", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_result_tables_keep_every_digit_when_stdout_is_piped(toy_store):
    payload = invoke_json(["stats", "--store", toy_store, "--n-resamples", "100"])
    result = _piped("stats", "--store", str(toy_store), "--n-resamples", "100")
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout, result.stdout
    lines = result.stdout.splitlines()
    for test in payload["friedman"]:  # every row whole: its full name, statistic and p-value on one line
        row = next((line for line in lines if f" {test['test']} " in line), None)
        assert row is not None and f"{test['statistic']:.2f}" in row and f"{test['p_value']:.3g}" in row, (
            test,
            row,
        )


def test_rank_json_has_every_head_of_the_layers_shown(toy_store):
    payload = invoke_json(["rank", "--store", toy_store, "--top", "2"])
    layers = [row["layer"] for row in payload["layers"]]
    heads = payload["heads"]
    assert len(layers) == 2 and len(heads) == 2 * 4 and {h["layer"] for h in heads} == set(layers)
    iou = open_store(toy_store).iou.values.astype(np.float64)  # (S, L, H): each head by hand
    for h in heads:
        values = iou[:, h["layer"], h["head"]]
        values = values[~np.isnan(values)]
        assert h["n"] == values.size == 12
        assert h["hi"] == pytest.approx(values.mean(), rel=1e-12)
        assert h["se"] == pytest.approx(values.std(ddof=1) / np.sqrt(values.size), rel=1e-9)
    assert [h["hi"] for h in heads] == sorted((h["hi"] for h in heads), reverse=True)
    assert [h["rank"] for h in heads] == list(range(1, 9))
    for layer in payload["layers"]:  # a layer's mean HI is its heads' mean
        mine = [h["hi"] for h in heads if h["layer"] == layer["layer"]]
        assert layer["mean_hi"] == pytest.approx(np.mean(mine), rel=1e-6)
    mass = invoke_json(["rank", "--store", toy_store, "--probe", "attention-mass"])
    assert len(mass["heads"]) == 12 * 4 and {"object_lift", "se", "n"} <= set(mass["heads"][0])


def test_rank_reads_the_store_a_few_times_not_once_per_head(toy_store):
    """`rank --json` computes its per-head rows from one read of the scores, not one lazy
    read per cell: 48 heads x 3 numbers would be 144 reads of the store."""
    from dask.callbacks import Callback

    reads = []
    with Callback(start=lambda dsk: reads.append(len(dsk))):
        payload = invoke_json(["rank", "--store", toy_store])
    assert len(payload["heads"]) == 12 * 4
    assert len(reads) < 20, f"{len(reads)} dask computes for one rank"
