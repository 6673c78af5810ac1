"""Attention-mass baselines: the kernel against hand-computed numbers, the store-level
probe against plain loops over the multi-view store, and `mechhi rank --probe`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from mechhi.commands import app
from mechhi.store import open_store
from probes.attention_mass import attention_mass, head_means, layer_ranking, sample_mass
from tests.conftest import GRIDS, H, L

nan = np.nan


def test_sample_mass_by_hand():
    # 2x3 grid padded from an own 2x2 (column 2 is outside the grid).
    coverage = np.array([[1.0, 0.5, nan], [0.0, 0.0, nan]])  # object area share (1 + 0.5) / 4 = 0.375
    attention = np.array(
        [
            [
                # visual 0.8; on object 0.4 * 1 + 0.1 * 0.5 = 0.45 -> share 0.5625, lift 1.5.
                # The 5.0 outside the grid must not count.
                [[0.4, 0.1, 5.0], [0.1, 0.2, nan]],
                # even attention: share = area share, lift exactly 1
                [[0.1, 0.1, nan], [0.1, 0.1, nan]],
                # no attention on the image: visual 0, share and lift undefined
                [[0.0, 0.0, nan], [0.0, 0.0, nan]],
            ]
        ]
    )  # (L=1, H=3, 2, 3)
    visual, share, lift = sample_mass({"image": attention}, {"image": coverage})
    np.testing.assert_allclose(visual, [[0.8, 0.4, 0.0]])
    np.testing.assert_allclose(share, [[0.5625, 0.375, nan]])
    np.testing.assert_allclose(lift, [[1.5, 1.0, nan]])


def test_sample_mass_pools_views_and_handles_an_absent_object():
    coverage = {"image": np.array([[1.0, 0.0]]), "global": np.array([[0.5]])}  # area (1 + 0.5) / 3 = 0.5
    attention = {"image": np.array([[[[0.2, 0.1]]]]), "global": np.array([[[[0.1]]]])}
    visual, share, lift = sample_mass(attention, coverage)
    np.testing.assert_allclose(visual, [[0.4]])
    np.testing.assert_allclose(share, [[(0.2 + 0.05) / 0.4]])
    np.testing.assert_allclose(lift, [[(0.25 / 0.4) / 0.5]])
    _, share, lift = sample_mass(attention, {"image": np.zeros((1, 2)), "global": np.zeros((1, 1))})
    np.testing.assert_allclose(share, [[0.0]])
    assert np.isnan(lift).all()  # no object tokens: lift undefined, not infinite
    with pytest.raises(ValueError, match="NaN attention"):
        sample_mass({"image": np.full((1, 1, 1, 2), nan)}, {"image": np.array([[0.5, 0.5]])})


def slow_mass(att: dict, cov: dict, s: int) -> np.ndarray:
    """(3, L, H) for one sample, plain loops over the sample's own tokens of every view."""
    tokens = [(v, r, c) for v, g in GRIDS[s].items() for r in range(g[0]) for c in range(g[1])]
    m = [cov[(s, v)][r, c] for v, r, c in tokens]
    area = sum(m) / len(m)
    out = np.zeros((3, L, H))
    for l in range(L):
        for h in range(H):
            a = [att[(s, v)][l, h, r, c] for v, r, c in tokens]
            share = sum(x * y for x, y in zip(a, m)) / sum(a)
            out[:, l, h] = sum(a), share, share / area if area else nan
    return out


def test_attention_mass_matches_slow_loop(multiview_store, monkeypatch):
    path, att, cov = multiview_store
    att = {k: v.astype(np.float32).astype(np.float64) for k, v in att.items()}  # as stored
    cov = {k: v.astype(np.float32).astype(np.float64) for k, v in cov.items()}
    monkeypatch.setattr("probes.maps.BLOCK_BYTES", 1)
    mass = attention_mass(open_store(path))
    for s in range(len(GRIDS)):
        got = np.stack(
            [
                mass[m].sel(sample=s).transpose("layer", "head").values
                for m in ("visual_mass", "object_share", "object_lift")
            ]
        )
        if s == 2:  # not done
            assert np.isnan(got).all()
        else:
            np.testing.assert_allclose(got, slow_mass(att, cov, s), rtol=1e-6)
    lift = np.stack([slow_mass(att, cov, s)[2] for s in (0, 1, 3, 4)])  # (4, L, H)
    np.testing.assert_allclose(
        head_means(mass).object_lift.transpose("layer", "head").values, lift.mean(0), rtol=1e-6
    )
    ranking = layer_ranking(mass)
    per_layer = lift.mean(0).mean(1)
    assert ranking.layer.values.tolist() == np.argsort(-per_layer, kind="stable").tolist()
    np.testing.assert_allclose(ranking.values, np.sort(per_layer)[::-1], rtol=1e-6)
    assert ranking["rank"].values.tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="unknown measure"):
        layer_ranking(mass, "iou")


def test_cli_rank_by_attention_mass(multiview_store):
    path, _, _ = multiview_store
    result = CliRunner().invoke(app, ["rank", "--store", str(path), "--probe", "attention-mass", "--json"])
    assert result.exit_code == 0, result.output
    assert "only 4 of 5 samples are traced" in result.stderr
    payload = json.loads(result.stdout)
    assert payload["probe"] == "attention-mass"
    expected = layer_ranking(attention_mass(open_store(path)))
    assert [r["layer"] for r in payload["layers"]] == expected.layer.values.tolist()
    assert [r["mean_object_lift"] for r in payload["layers"]] == pytest.approx(expected.values.tolist())
    assert {"mean_object_share", "mean_visual_mass"} <= set(payload["layers"][0])
    assert "head_impact" not in open_store(path)  # a baseline never writes into the store
    unknown = CliRunner().invoke(app, ["rank", "--store", str(path), "--probe", "pursuit"])
    assert unknown.exit_code == 1 and "available: head-impact, attention-mass" in unknown.output
