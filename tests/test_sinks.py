"""Visual attention sinks on constructed maps with a planted sink, Head Impact's
mean-without-sinks rule, and `stats` / `rank --exclude-sinks`."""

from __future__ import annotations

import numpy as np
import pytest

from probes import sinks
from probes.head_impact import BinarizeRule, sample_iou
from tests.helpers import cli_trace, invoke, invoke_json, one_line_error


def planted(n: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """One head on a 1 x n grid: object tokens 0 and 1 (0.05 each), a sink on token n-1
    (0.6) off the object, 0.01 elsewhere; coverage 1 on the object."""
    att = np.full(n, 0.01)
    att[[0, 1]] = 0.05
    att[-1] = 0.6
    cov = np.zeros(n)
    cov[[0, 1]] = 1.0
    return att.reshape(1, 1, 1, n), cov.reshape(1, n)


def test_a_planted_sink_is_found_with_its_share():
    att, cov = planted()
    total = att.sum()
    result = sinks.sample_sinks({"image": att}, {"image": cov}, tau=10.0, top_k=2)[:, 0, 0]
    share, count, top, on_object, n = result
    assert count == 1 and n == 30
    assert share == pytest.approx(0.6 / total)
    assert top == pytest.approx((0.6 + 0.05) / total)
    assert on_object == 0.0  # the sink is off the object: a sink, not a focus
    mask = sinks.sink_tokens(att.reshape(1, -1), np.ones(30, bool), tau=10.0)
    assert mask.nonzero()[1].tolist() == [29]
    # tau above the sink's ratio to the mean (0.6 / (0.97 / 30) = 18.6): no sink
    none = sinks.sample_sinks({"image": att}, {"image": cov}, tau=20.0)[:, 0, 0]
    assert none[1] == 0 and none[0] == 0.0 and np.isnan(none[3])


def test_fewer_than_n_over_tau_tokens_can_be_sinks():
    rng = np.random.default_rng(1)
    att = rng.random((200, 64)) ** 8
    counts = sinks.sink_tokens(att, np.ones(64, bool), tau=5.0).sum(-1)
    assert counts.max() < 64 / 5 and counts.max() >= 1


def test_head_impact_without_sinks_binarises_around_the_sink():
    att, cov = planted()
    plain = BinarizeRule(sink_tau=10.0)
    assert float(sample_iou({"image": att}, {"image": cov}, plain)[0, 0]) == pytest.approx(
        2 / 3
    )  # A = {0, 1, sink}
    rule = BinarizeRule(attention="mean-without-sinks", sink_tau=10.0)
    assert float(sample_iou({"image": att}, {"image": cov}, rule)[0, 0]) == 1.0  # A = {0, 1}
    assert "sink_tau" not in BinarizeRule().to_dict()  # the default rule reads as before
    assert BinarizeRule.from_dict(rule.to_dict()) == rule
    with pytest.raises(ValueError, match="choose from mean, mean-without-sinks"):
        BinarizeRule(attention="max")


def test_cli_stats_reports_sinks_and_rank_excludes_them(tiny_model_dir, dataset_dir, tmp_path):
    store = tmp_path / "s.zarr"
    cli_trace(tiny_model_dir, dataset_dir, store)
    payload = invoke_json(["stats", "--store", store, "--n-resamples", "100", "--sink-tau", "3"])
    from mechhi.store import open_store

    reference = sinks.sinks(open_store(store), tau=3.0)
    summary = payload["sinks"]
    assert summary["tau"] == 3.0 and len(summary["layers"]) == 3 and summary["samples"] == 10
    assert summary["mean_sink_share"] == pytest.approx(float(reference.sink_share.mean()))
    assert summary["share_with_sinks"] == pytest.approx(float((reference.n_sinks > 0).mean()))
    assert "Visual attention sinks" in invoke(["stats", "--store", store, "--n-resamples", "100"]).stdout
    ranked = invoke_json(["rank", "--store", store, "--exclude-sinks", "--sink-tau", "3"])
    assert ranked["binarize"]["attention"] == "mean-without-sinks" and ranked["binarize"]["sink_tau"] == 3.0
    message = one_line_error(
        invoke(["rank", "--store", store, "--exclude-sinks", "--sink-tau", "1"], exit_code=1)
    )
    assert "sink_tau=1.0 must be above 1" in message
