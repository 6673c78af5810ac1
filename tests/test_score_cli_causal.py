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
    assert len(friedman) == 1 + 12 and friedman["layers"]["df"] == 11
    iou = open_store(toy_store).iou.values  # (S, L, H): the layers test by hand
    expected = scipy_stats.friedmanchisquare(*iou.mean(2).T)
    assert friedman["layers"]["statistic"] == pytest.approx(expected.statistic, rel=1e-6)
    boot = payload["bootstrap"]
    assert boot["unit"] == "image" and boot["k"] == 3 and len(boot["layers"]) == 12
    assert sum(r["top_k_share"] for r in boot["layers"]) == pytest.approx(3.0)
    assert all(r["ci_low"] <= r["mean_hi"] <= r["ci_high"] for r in boot["layers"])
    table = CliRunner().invoke(app, ["stats", "--store", str(toy_store), "--n-resamples", "200"])
    assert table.exit_code == 0 and "Friedman" in table.stdout and "the paper's test" in table.stdout
    bad = CliRunner().invoke(app, ["stats", "--store", str(toy_store), "--resample", "pixel"])
    assert bad.exit_code == 1 and "unknown unit 'pixel'" in bad.output


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
