"""The COCO builder on a hand-made instances file: polygons (one and several parts),
compressed and uncompressed RLE, crowd, tiny, broken and unknown annotations.

Masks are checked against pycocotools' own `COCO.annToMask`, counts against the
construction of the file.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from mechhi.data import load_dataset
from mechhi.data.coco import build_from_coco, describe, segmentation_to_mask

H1, W1 = 40, 50  # image 1, (H, W)
H2, W2 = 30, 32


def _rle(mask: np.ndarray) -> dict:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _uncompressed(mask: np.ndarray) -> dict:
    """COCO's iscrowd form: run lengths over the column-major pixels, zeros first."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0] + runs
    return {"size": [mask.shape[0], mask.shape[1]], "counts": runs}


def _box(h, w, y0, y1, x0, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


ANNS = [
    # image 1: two dogs (polygons), an apple (compressed RLE), scissors (uncompressed RLE),
    # a crowd of people (uncompressed RLE), a tiny person polygon, a broken polygon
    dict(id=10, image_id=1, category_id=1, iscrowd=0, segmentation=[[2, 2, 30, 3, 28, 25, 4, 20]]),
    dict(id=11, image_id=1, category_id=1, iscrowd=0, segmentation=[[35, 30, 45, 30, 45, 38]]),
    dict(id=12, image_id=1, category_id=2, iscrowd=0, segmentation=_rle(_box(H1, W1, 30, 39, 2, 20))),
    dict(
        id=13, image_id=1, category_id=3, iscrowd=0, segmentation=_uncompressed(_box(H1, W1, 0, 10, 40, 50))
    ),
    dict(
        id=14, image_id=1, category_id=4, iscrowd=1, segmentation=_uncompressed(_box(H1, W1, 10, 30, 30, 48))
    ),
    dict(id=15, image_id=1, category_id=4, iscrowd=0, segmentation=[[1, 36, 3, 36, 3, 38, 1, 38]]),
    dict(id=16, image_id=1, category_id=5, iscrowd=0, segmentation=[[1, 2, 3, 4]]),
    # image 2: an apple in two parts; a dog whose RLE has the wrong size
    dict(
        id=20,
        image_id=2,
        category_id=2,
        iscrowd=0,
        segmentation=[[1, 1, 10, 1, 10, 10, 1, 10], [20, 20, 30, 20, 30, 28, 20, 28]],
    ),
    dict(id=21, image_id=2, category_id=1, iscrowd=0, segmentation=_rle(_box(H1, W1, 0, 5, 0, 5))),
    # image 3: missing file; image 4: file of the wrong size; image 9: not in images
    dict(id=30, image_id=3, category_id=1, iscrowd=0, segmentation=[[1, 1, 8, 1, 8, 8]]),
    dict(id=40, image_id=4, category_id=1, iscrowd=0, segmentation=[[1, 1, 8, 1, 8, 8]]),
    dict(id=90, image_id=9, category_id=1, iscrowd=0, segmentation=[[1, 1, 8, 1, 8, 8]]),
    dict(id=91, image_id=1, category_id=77, iscrowd=0, segmentation=[[1, 1, 8, 1, 8, 8]]),
]
CATEGORIES = [
    dict(id=1, name="dog"),
    dict(id=2, name="apple"),
    dict(id=3, name="scissors"),
    dict(id=4, name="person"),
    dict(id=5, name="kite"),
]
IMAGES = [
    dict(id=i, file_name=f"{i:012d}.jpg", height=h, width=w)
    for i, h, w in ((1, H1, W1), (2, H2, W2), (3, 20, 20), (4, 20, 20), (5, 20, 20))
]


@pytest.fixture
def coco(tmp_path):
    """(instances path, captions path, images dir, pycocotools COCO of the same file)."""
    images = tmp_path / "val"
    images.mkdir()
    for im in IMAGES:
        if im["id"] == 3:
            continue  # missing
        size = (im["width"], im["height"]) if im["id"] != 4 else (21, 20)
        Image.new("RGB", size).save(images / im["file_name"])
    inst = tmp_path / "instances.json"
    inst.write_text(json.dumps({"images": IMAGES, "annotations": ANNS, "categories": CATEGORIES}))
    caps = tmp_path / "captions.json"
    caps.write_text(
        json.dumps(
            {
                "images": IMAGES,
                "annotations": [
                    dict(id=1, image_id=1, caption="  Two dogs and\nan apple. "),
                    dict(id=2, image_id=1, caption="Not the first one."),
                ],
            }
        )
    )
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        ref = COCO(str(inst))
    return inst, caps, images, ref


def _samples(out):
    return {s.object_id: s for s in load_dataset(out)}


def test_masks_match_pycocotools(coco, tmp_path):
    inst, caps, images, ref = coco
    report = build_from_coco(inst, images, tmp_path / "out", captions_json=caps, min_area=20, progress=False)
    got = _samples(tmp_path / "out")
    # image 1: larger dog 10 (not 11), apple 12, scissors 13; crowd 14 and tiny 15 out
    # image 2: apple 20 (two polygon parts); dog 21 has an RLE of the wrong size
    assert set(got) == {"10", "12", "13", "20"}
    for oid, s in got.items():
        np.testing.assert_array_equal(s.mask(), ref.annToMask(ref.anns[int(oid)]).astype(bool))
    np.testing.assert_array_equal(got["13"].mask(), _box(H1, W1, 0, 10, 40, 50))  # RLE helper is right
    assert got["12"].description == "an apple" and got["13"].description == "a pair of scissors"
    assert got["10"].record.caption == "Two dogs and an apple."
    assert got["20"].record.caption is None
    assert got["10"].obj.attributes["instances"] == 2
    assert [o.object_id for o in got["10"].record.objects] == ["10", "12", "13"]  # largest first
    assert (report.kept_images, report.kept_objects) == (2, 4)
    assert report.dropped == Counter(
        {
            "smaller instance": 1,
            "crowd": 1,
            "small area": 1,
            "bad segmentation": 2,
            "missing image": 1,
            "image size mismatch": 1,
            "unknown image": 1,
            "unknown category": 1,
        }
    )
    assert report.dropped_images == Counter(
        {"missing image": 1, "image size mismatch": 1, "no annotations": 1}
    )
    assert "kept 2 images, 4 objects" in str(report)


def test_area_filter(coco, tmp_path):
    inst, _, images, ref = coco
    areas = {i: int(ref.annToMask(ref.anns[i]).sum()) for i in (10, 11, 12, 13, 15, 20)}
    tiny = areas[15]  # the tiny person
    assert 0 < tiny < areas[12]
    build_from_coco(inst, images, tmp_path / "a", min_area=tiny, progress=False)
    assert "15" in _samples(tmp_path / "a")
    report = build_from_coco(inst, images, tmp_path / "b", min_area=tiny + 1, progress=False)
    assert "15" not in _samples(tmp_path / "b")
    # every kept object is at least min_area, every object at least min_area is kept
    threshold = areas[12]
    build_from_coco(inst, images, tmp_path / "c", min_area=threshold, progress=False)
    kept = {int(k) for k in _samples(tmp_path / "c")}
    assert kept == {i for i in (10, 12, 13, 20) if areas[i] >= threshold}
    assert report.dropped["small area"] == 1


def test_category_filter_and_crowd(coco, tmp_path):
    inst, _, images, ref = coco
    build_from_coco(inst, images, tmp_path / "a", categories=["dog"], min_area=20, progress=False)
    assert set(_samples(tmp_path / "a")) == {"10"}
    build_from_coco(inst, images, tmp_path / "b", categories=[2, "scissors"], min_area=20, progress=False)
    assert set(_samples(tmp_path / "b")) == {"12", "13", "20"}
    build_from_coco(
        inst, images, tmp_path / "c", categories=["person"], skip_crowd=False, min_area=20, progress=False
    )
    crowd = _samples(tmp_path / "c")["14"]
    np.testing.assert_array_equal(crowd.mask(), ref.annToMask(ref.anns[14]).astype(bool))
    with pytest.raises(ValueError, match="unknown COCO category 'cat'"):
        build_from_coco(inst, images, tmp_path / "d", categories=["cat"], progress=False)


def test_unique_and_max_objects(coco, tmp_path):
    inst, _, images, _ = coco
    report = build_from_coco(inst, images, tmp_path / "a", instances="unique", min_area=20, progress=False)
    assert set(_samples(tmp_path / "a")) == {"12", "13", "20"}
    assert report.dropped["several instances"] == 3  # two dogs, the tiny person (beside a crowd)
    report = build_from_coco(
        inst, images, tmp_path / "b", max_objects_per_image=2, min_area=20, progress=False
    )
    assert set(_samples(tmp_path / "b")) == {"10", "12", "20"}  # scissors is image 1's smallest
    assert report.dropped["over max objects"] == 1


def test_resume(coco, tmp_path):
    inst, _, images, _ = coco
    first = build_from_coco(inst, images, tmp_path / "a", min_area=20, progress=False)
    again = build_from_coco(inst, images, tmp_path / "a", min_area=20, progress=False)
    assert (again.kept_images, again.resumed_images) == (0, first.kept_images)


def test_segmentation_errors_and_describe():
    with pytest.raises(ValueError, match="at least 3"):
        segmentation_to_mask([[1, 2, 3]], 10, 10)
    with pytest.raises(ValueError, match="not the image's"):
        segmentation_to_mask({"size": [5, 5], "counts": [25]}, 10, 10)
    with pytest.raises(ValueError, match="cover"):
        segmentation_to_mask({"size": [10, 10], "counts": [3, 4]}, 10, 10)
    assert [describe(n) for n in ("umbrella", "dog", "skis")] == ["an umbrella", "a dog", "a pair of skis"]
