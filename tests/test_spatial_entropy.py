"""Kang et al.'s localization heads: spatial entropy on maps with known components, the
elbow rule on a constructed curve, the selection, and `rank --probe spatial-entropy`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr

from probes.spatial_entropy import chosen_heads, elbow, select_heads, spatial_entropy
from tests.helpers import cli_trace, invoke, invoke_json, one_line_error


def blobs(*boxes, shape=(8, 8)) -> np.ndarray:
    m = np.zeros(shape)
    for r0, c0, r1, c1 in boxes:
        m[r0:r1, c0:c1] = 1.0
    return m


def test_one_blob_has_entropy_zero_and_two_equal_blobs_ln2():
    assert spatial_entropy({"image": blobs((1, 1, 4, 4))}) == 0.0
    assert spatial_entropy({"image": blobs((0, 0, 2, 2), (5, 5, 7, 7))}) == pytest.approx(math.log(2))
    sizes = np.array([4.0, 1.0])  # a 2x2 blob and one far cell: by hand
    expected = -sum(p * math.log(p) for p in sizes / sizes.sum())
    assert spatial_entropy({"image": blobs((0, 0, 2, 2), (6, 6, 7, 7))}) == pytest.approx(expected)


def test_components_are_8_connected_and_views_are_separate():
    diagonal = np.eye(4)  # cells touching at corners: one component
    assert spatial_entropy({"image": diagonal}) == 0.0
    # the same blob in two views: two components of equal size (mean over both views' tokens)
    assert spatial_entropy(
        {"image": blobs((0, 0, 2, 2)), "global": blobs((0, 0, 2, 2), shape=(4, 4))}
    ) == pytest.approx(math.log(2))
    assert math.isnan(spatial_entropy({"image": np.ones((3, 3))}))  # flat: no place


def test_entropy_of_stacked_heads_equals_one_map_at_a_time():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 2, 5, 6)) ** 4
    stacked = spatial_entropy({"image": maps})
    for l in range(3):
        for h in range(2):
            assert stacked[l, h] == pytest.approx(spatial_entropy({"image": maps[l, h]}))


def test_elbow_of_a_constructed_curve():
    # a sharp drop after three high values, then a flat tail: the chord's farthest point is the drop's foot
    curve = np.array([1.0, 0.95, 0.9, 0.1, 0.08, 0.06, 0.04, 0.02, 0.0])
    x = np.linspace(0, 1, curve.size)
    distance = np.abs((1 - x) - (curve - curve[-1]) / (curve[0] - curve[-1]))  # by hand
    assert elbow(curve) == int(np.argmax(distance)) == 3
    assert elbow(np.array([10.0, 2.0, 1.5, 1.0, 0.5, 0.0])) == 1
    assert elbow(np.full(5, 0.3)) == 4  # flat: keep all
    with pytest.raises(ValueError, match="sorted from high to low"):
        elbow(np.array([1.0, 2.0]))


def test_selection_keeps_focused_heads_that_look_at_the_image():
    # 4 heads (1 layer): head 0 focused + much image attention, head 1 diffuse + much,
    # head 2 focused but hardly looks at the image, head 3 in between
    S = 6
    entropy = np.tile([0.0, 1.5, 0.0, 0.8], (S, 1))[:, None, :]
    mass = np.tile([0.9, 0.9, 0.05, 0.85], (S, 1))[:, None, :]
    loc = xr.Dataset(
        {
            "spatial_entropy": (("sample", "layer", "head"), entropy),
            "visual_mass": (("sample", "layer", "head"), mass),
        },
        coords={"sample": range(S), "layer": [0], "head": range(4)},
    )
    sel = select_heads(loc, k=1)
    assert sel.candidate.values.tolist() == [[True, True, False, True]]  # head 2 below the mass elbow
    assert sel.selection_frequency.values.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert chosen_heads(sel) == [(0, 0)]
    assert chosen_heads(sel, 1) == [(0, 0)]


def test_cli_rank_spatial_entropy(tiny_model_dir, dataset_dir, tmp_path):
    store = tmp_path / "s.zarr"
    cli_trace(tiny_model_dir, dataset_dir, store)
    payload = invoke_json(["rank", "--store", store, "--probe", "spatial-entropy"])
    assert payload["probe"] == "spatial-entropy" and len(payload["layers"]) == 3
    assert payload["selection"]["n_selected"] == len(payload["heads"]) >= 1
    from mechhi.store import open_store
    from probes.spatial_entropy import localization

    sel = select_heads(localization(open_store(store)))
    best = payload["layers"][0]
    assert best["mean_selection_frequency"] == pytest.approx(
        float(sel.selection_frequency.mean("head").max())
    )
    table = invoke(["rank", "--store", store, "--probe", "spatial-entropy"])
    assert "Localization heads" in table.stdout
    assert "unknown probe 'nope'" in one_line_error(
        invoke(["rank", "--store", store, "--probe", "nope"], exit_code=1)
    )
