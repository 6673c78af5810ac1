"""The paper-format converter, on the real published json + masks and on a hand-made
file with one entry per anomaly.

COCO images are not available, so blank images are made at the size the masks imply;
expected counts are recomputed here straight from the json, not through the converter.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import scipy.sparse
from PIL import Image

from mechhi.data import load_dataset
from mechhi.data.paper import build_from_paper
from tests.paper_data import SOURCE, needs_source

# entries 2 and 11 repeat phrases, 3 has low scores, 267 has labels but no masks,
# 277 has no phrase at all; the rest are the first ones in the file.
PICK = [2, 3, 11, 267, 277] + [i for i in range(40) if i not in (2, 3, 11)][:15]


def _npz(name: str) -> np.ndarray:
    return scipy.sparse.load_npz(SOURCE / "masks" / name).toarray() > 0


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """(entries, picked entries, images dir) with blank images for the picked entries."""
    entries = json.loads((SOURCE / "dataset_masks.json").read_text())
    images = tmp_path_factory.mktemp("coco_images")
    for i in PICK:
        e = entries[i]
        files = e["grounding"]["masks_file_name"]
        h, w = _npz(files[0][0]).shape if files else (480, 640)
        Image.new("RGB", (w, h)).save(images / e["image_file_name"])
    return entries, [entries[i] for i in PICK], images


def _expected(entries: list[dict], threshold: float) -> tuple[int, int, int]:
    """(images, merged objects, separate boxes) kept from ``entries``, counted directly."""
    images = objects = boxes = 0
    for e in entries:
        g = e["grounding"]
        if len({len(v) for v in g.values()}) != 1:
            continue
        good = [lab for lab, s in zip(g["labels"], g["masks_scores"]) if s[0] >= threshold]
        images += bool(good)
        objects += len(set(good))
        boxes += len(good)
    return images, objects, boxes


@needs_source
def test_real_subset_counts_and_masks(real, tmp_path):
    entries, picked, images = real
    report = build_from_paper(SOURCE, images, tmp_path / "out", progress=False)
    n_images, n_objects, _ = _expected(picked, 0.85)
    assert (report.kept_images, report.kept_objects) == (n_images, n_objects)
    assert n_objects > 20  # the subset is not trivially small

    absent = [e for i, e in enumerate(entries) if i not in PICK]
    consistent = [e for e in absent if len({len(v) for v in e["grounding"].values()}) == 1]
    missing = sum(len(e["grounding"]["labels"]) for e in consistent)
    assert report.dropped["missing image"] == missing
    assert report.dropped_images["missing image"] == sum(1 for e in consistent if e["grounding"]["labels"])
    low = sum(s[0] < 0.85 for e in picked for s in e["grounding"]["masks_scores"])
    assert report.dropped["low mask score"] == low > 0
    assert report.dropped["length mismatch"] == 4  # entry 267: 4 labels, no masks
    assert report.dropped_images["no grounded phrases"] == 2  # entries 277 and 639
    assert report.extra_mask_files == []

    ds = load_dataset(tmp_path / "out")
    assert len(ds) == n_objects
    by_key = {(s.image_id, s.description): s for s in ds}
    single = by_key[("000000115946", "The street light")]  # entry 0: one box
    np.testing.assert_array_equal(single.mask(), _npz("e0o0m0.npz"))
    assert single.record.caption == entries[0]["annotation_full_text"]
    bears = by_key[(f"{entries[2]['image_id']:012d}", "Two large identical teddy bears")]
    union = _npz("e2o0m0.npz") | _npz("e2o1m0.npz") | _npz("e2o2m0.npz")
    np.testing.assert_array_equal(bears.mask(), union)
    assert bears.obj.attributes["mask_files"] == ["e2o0m0.npz", "e2o1m0.npz", "e2o2m0.npz"]


@needs_source
def test_real_subset_separate_and_resume(real, tmp_path):
    entries, picked, images = real
    _, _, n_boxes = _expected(picked, 0.85)
    report = build_from_paper(SOURCE, images, tmp_path / "out", duplicates="separate", progress=False)
    assert report.kept_objects == n_boxes
    again = build_from_paper(SOURCE, images, tmp_path / "out", duplicates="separate", progress=False)
    assert (again.kept_images, again.resumed_images) == (0, report.kept_images)
    assert len(load_dataset(tmp_path / "out")) == n_boxes


# ----------------------------------------------------------------------------- anomalies


def _mask(h: int, w: int, box: tuple[int, int, int, int] | None) -> np.ndarray:
    m = np.zeros((h, w), bool)
    if box is not None:
        y0, y1, x0, x1 = box
        m[y0:y1, x0:x1] = True
    return m


def _entry(image_id, labels, scores, files, boxes=None, name=None):
    return {
        "image_id": image_id,
        "annotation_id": 1,
        "annotation_full_text": f"caption {image_id}",
        "image_file_name": name or f"{image_id:012d}.jpg",
        "grounding": {
            "bboxes": boxes if boxes is not None else [[0.0, 0.0, 4.0, 4.0]] * len(labels),
            "labels": labels,
            "masks_scores": [[s] for s in scores],
            "masks_file_name": [[f] for f in files],
        },
    }


@pytest.fixture
def tiny_source(tmp_path):
    """A source with one entry per anomaly, images 8x10 (HxW)."""
    src, images = tmp_path / "src", tmp_path / "images"
    (src / "masks").mkdir(parents=True)
    images.mkdir()
    masks = {
        "a.npz": _mask(8, 10, (0, 4, 0, 4)),
        "b.npz": _mask(8, 10, (4, 8, 5, 10)),
        "c.npz": _mask(8, 10, (0, 2, 8, 10)),
        "empty.npz": _mask(8, 10, None),
        "wrong.npz": _mask(10, 8, (0, 4, 0, 4)),
        "extra.npz": _mask(8, 10, (0, 1, 0, 1)),
    }
    for name, m in masks.items():
        scipy.sparse.save_npz(src / "masks" / name, scipy.sparse.csr_matrix(m.astype(np.float32)))
    (src / "masks" / "broken.npz").write_bytes(b"not a zip")
    entries = [
        _entry(
            1,
            ["a cat", "a dog", "a dog", "a dog"],
            [0.9, 0.95, 0.5, 0.9],
            ["a.npz", "b.npz", "a.npz", "c.npz"],
        ),
        _entry(1, ["a cat"], [0.9], ["a.npz"]),  # duplicate image entry
        _entry(2, [], [], []),  # no grounded phrases
        {**_entry(3, ["x", "y"], [], []), "annotation_full_text": "labels without masks"},  # length mismatch
        _entry(4, ["a cat"], [0.9], ["a.npz"]),  # missing image
        _entry(5, ["a cat"], [0.9], ["a.npz"]),  # unreadable image
        _entry(
            6,
            ["", "missing", "broken", "shape", "empty", "nan", "box", "ok"],
            [0.9, 0.9, 0.9, 0.9, 0.9, float("nan"), 0.9, 0.9],
            ["a.npz", "nope.npz", "broken.npz", "wrong.npz", "empty.npz", "a.npz", "a.npz", "b.npz"],
            boxes=[[0.0, 0.0, 4.0, 4.0]] * 6 + [[1.0, 2.0]] + [[0.0, 0.0, 4.0, 4.0]],
        ),
        _entry(7, ["low"], [0.1], ["a.npz"]),  # no objects left
        {"image_id": 8, "grounding": {}},  # malformed
        _entry(9, ["a cat"], [0.9], ["a.npz"], name="../escape.jpg"),  # malformed file name
    ]
    (src / "dataset_masks.json").write_text(json.dumps(entries))  # nan is written as NaN
    for i in (1, 2, 3, 6, 7):
        Image.new("RGB", (10, 8)).save(images / f"{i:012d}.jpg")
    (images / f"{5:012d}.jpg").write_bytes(b"garbage")
    return src, images, masks


def test_every_anomaly_is_reported(tiny_source, tmp_path):
    src, images, masks = tiny_source
    report = build_from_paper(src, images, tmp_path / "out", progress=False)
    assert report.dropped == Counter(
        {
            "low mask score": 2,  # image 1's second "a dog", image 7
            "duplicate image entry": 1,
            "length mismatch": 2,
            "missing image": 1,
            "unreadable image": 1,
            "empty label": 1,
            "missing mask file": 1,
            "unreadable mask file": 1,
            "mask shape mismatch": 1,
            "empty mask": 1,
            "bad mask score": 1,
            "bad box": 1,
        }
    )
    assert report.dropped_images == Counter(
        {
            "duplicate image entry": 1,
            "no grounded phrases": 1,
            "length mismatch": 1,
            "missing image": 1,
            "unreadable image": 1,
            "no objects left": 1,
            "malformed entry": 2,
        }
    )
    assert ("000000000006", "broken", "unreadable mask file") in [d[:3] for d in report.details]
    assert report.extra_mask_files == ["extra.npz"]
    assert report.merged_boxes == 1  # "a dog" b.npz + c.npz
    assert (report.kept_images, report.kept_objects) == (2, 3)
    text = str(report)
    assert "low mask score" in text and "kept 2 images, 3 objects" in text

    ds = load_dataset(tmp_path / "out")
    got = {(s.image_id, s.description): s for s in ds}
    assert set(got) == {("000000000001", "a cat"), ("000000000001", "a dog"), ("000000000006", "ok")}
    np.testing.assert_array_equal(got[("000000000001", "a dog")].mask(), masks["b.npz"] | masks["c.npz"])
    np.testing.assert_array_equal(got[("000000000006", "ok")].mask(), masks["b.npz"])
    assert got[("000000000001", "a dog")].object_id == "1"  # index of the phrase's first box


@pytest.mark.parametrize(
    "policy, dogs", [("first", ["b.npz"]), ("separate", ["b.npz", "c.npz"]), ("drop", [])]
)
def test_duplicate_policies(tiny_source, tmp_path, policy, dogs):
    src, images, masks = tiny_source
    report = build_from_paper(src, images, tmp_path / "out", duplicates=policy, progress=False)
    ds = load_dataset(tmp_path / "out")
    dog_masks = [s.mask() for s in ds if s.description == "a dog"]
    assert len(dog_masks) == len(dogs)
    for m, name in zip(dog_masks, dogs):
        np.testing.assert_array_equal(m, masks[name])
    assert report.dropped["duplicate phrase"] == {"first": 1, "separate": 0, "drop": 2}[policy]


def test_bad_arguments(tiny_source, tmp_path):
    src, images, _ = tiny_source
    with pytest.raises(ValueError, match="duplicates must be one of"):
        build_from_paper(src, images, tmp_path / "o", duplicates="union", progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        build_from_paper(tmp_path / "nowhere", images, tmp_path / "o", progress=False)
