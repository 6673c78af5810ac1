"""Training-free grounding: a planted box grounds with IoU 1, box IoU by hand, the whole-image
reference, and `mechhi ground` on a small traced store."""

from __future__ import annotations

import numpy as np
import pytest

from probes.grounding import attended_region, bounding_box, box_iou, sample_grounding
from tests.helpers import cli_trace, invoke, invoke_json, one_line_error


def test_a_planted_box_grounds_with_iou_one():
    L, H, R, C = 2, 3, 6, 7
    att = np.full((L, H, R, C), 0.001)
    att[1, 2, 2:4, 3:6] = 0.2  # the grounding head looks at the object
    att[0, 0, 5, 0] = 0.3  # another head looks elsewhere; it is not used
    cov = np.zeros((R, C))
    cov[2:4, 3:6] = 0.9
    cov[1, 3] = 0.2  # under the mask threshold: not the object's
    padded_att = np.full((L, H, 8, 8), np.nan)
    padded_att[..., :R, :C] = att
    padded_cov = np.full((8, 8), np.nan)
    padded_cov[:R, :C] = cov
    result = sample_grounding({"image": padded_att}, {"image": padded_cov}, np.array([1]), np.array([2]))
    assert result.tolist() == [1.0, 1.0]
    both = sample_grounding({"image": padded_att}, {"image": padded_cov}, np.array([1, 0]), np.array([2, 0]))
    assert both.tolist() == [1.0, 1.0]  # the other head's single cell is the smaller component


def test_box_iou_and_the_largest_region_by_hand():
    assert box_iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert box_iou((0, 0, 1, 1), (1, 1, 2, 2)) == pytest.approx(1 / 7)  # 1 shared cell of 4 + 4 - 1
    assert box_iou((0, 0, 0, 0), (2, 2, 3, 3)) == 0.0
    m = np.zeros((5, 5))
    m[0, 0] = 5.0  # the heaviest, but one cell
    m[2:5, 2:4] = 1.0
    region = attended_region(m)
    assert bounding_box(region) == (2, 2, 4, 3)
    assert attended_region(np.ones((3, 3))) is None
    smoothed = attended_region(m, sigma=1.0)
    assert smoothed.sum() > 0
    with pytest.raises(ValueError, match="--smooth"):
        attended_region(m, sigma=-1)


def test_cli_ground(tiny_model_dir, dataset_dir, tmp_path):
    store = tmp_path / "s.zarr"
    cli_trace(tiny_model_dir, dataset_dir, store)
    payload = invoke_json(
        ["ground", "--store", store, "--by", "spatial-entropy,head-impact", "--n-heads", "2"]
    )
    by = {g["by"]: g for g in payload["groundings"]}
    assert set(by) == {"spatial-entropy", "head-impact"} and all(len(g["heads"]) == 2 for g in by.values())
    from mechhi.store import open_store
    from probes.grounding import ground

    again = ground(open_store(store), [tuple(h) for h in by["head-impact"]["heads"]])
    assert by["head-impact"]["box_accuracy"] == pytest.approx(float((again.box_iou >= 0.5).mean()))
    assert 0.0 <= payload["whole_image"]["box_iou_mean"] <= 1.0
    assert payload["overlap"][0]["shared"] == len(
        {tuple(h) for h in by["head-impact"]["heads"]} & {tuple(h) for h in by["spatial-entropy"]["heads"]}
    )
    assert "whole image" in invoke(["ground", "--store", store]).stdout
    assert "--by nope: choose" in one_line_error(
        invoke(["ground", "--store", store, "--by", "nope"], exit_code=1)
    )
    with pytest.raises(ValueError, match="head 7:0 is not in the store"):
        ground(open_store(store), [(7, 0)])
