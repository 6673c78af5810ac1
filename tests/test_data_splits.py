"""Image-level splits: deterministic, disjoint, and in the paper's proportions.

Expected sizes are computed here from the fractions (1/3 trace, then 1200:300:500 of
the rest), and object counts per split are recounted from the rewritten dataset.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mechhi.data import DatasetWriter, ImageRecord, KeyObject, load_dataset
from mechhi.data.format import ANNOTATIONS, SPLITS
from mechhi.data.splits import assign_splits, split_fractions, write_splits

EXACT = {"trace": 1 / 3, "train": 2 / 3 * 0.6, "val": 2 / 3 * 0.15, "test": 2 / 3 * 0.25}


def test_fractions_are_the_papers():
    got = split_fractions(1 / 3, (1200, 300, 500))
    assert got == pytest.approx(EXACT)
    # the paper's 3,000 samples: 1,000 traced, 1,200 / 300 / 500 for fine-tuning
    counts = Counter(assign_splits([f"{i:05d}" for i in range(3000)], seed=3).values())
    assert counts == {"trace": 1000, "train": 1200, "val": 300, "test": 500}


def test_deterministic_and_order_free():
    ids = [f"img{i}" for i in range(50)]
    a = assign_splits(ids, seed=1)
    assert a == assign_splits(list(reversed(ids)), seed=1)
    assert a != assign_splits(ids, seed=2)
    assert set(a) == set(ids) and set(a.values()) <= set(SPLITS)


@pytest.mark.parametrize("n", [7, 20, 101])
def test_image_counts_within_rounding(n):
    counts = Counter(assign_splits([str(i) for i in range(n)], seed=0).values())
    cumulative = 0.0
    got_cumulative = 0
    for s in SPLITS:  # each running total is the exact running share, rounded
        cumulative += EXACT[s] * n
        got_cumulative += counts[s]
        assert abs(got_cumulative - cumulative) <= 0.5 + 1e-9


def test_weighted_by_objects():
    rng = np.random.default_rng(0)
    weights = {f"{i:03d}": int(rng.integers(1, 6)) for i in range(200)}
    split_of = assign_splits(weights, seed=0)
    total = sum(weights.values())
    objects = Counter()
    for image_id, s in split_of.items():
        objects[s] += weights[image_id]
    for s in SPLITS:  # within one image's objects (at most 5) of the exact share
        assert abs(objects[s] - EXACT[s] * total) <= 5


def test_bad_arguments():
    with pytest.raises(ValueError, match="finetune_ratios"):
        assign_splits(["a"], finetune_ratios=(1, 2))
    with pytest.raises(ValueError, match="trace_fraction"):
        assign_splits(["a"], trace_fraction=1.5)
    with pytest.raises(ValueError, match="'a' is listed more than once"):
        assign_splits(["a", "b", "a"])
    with pytest.raises(ValueError, match="object count"):
        assign_splits({"a": -1})


@pytest.fixture
def dataset(tmp_path):
    """60 tiny images with 1-4 objects each; returns (root, objects per image)."""
    rng = np.random.default_rng(1)
    n_objects = {}
    full = np.ones((4, 4), bool)
    with DatasetWriter(tmp_path / "ds") as w:
        for i in range(60):
            k = int(rng.integers(1, 5))
            objs = tuple(
                KeyObject.from_mask(str(j), f"thing {j}", np.eye(4, dtype=bool) if j % 2 else full)
                for j in range(k)
            )
            image_id = f"{i:04d}"
            w.add(ImageRecord(image_id, "", 4, 4, f"caption {i}", objs), Image.new("RGB", (4, 4)))
            n_objects[image_id] = k
    return tmp_path / "ds", n_objects


def test_write_splits(dataset):
    root, n_objects = dataset
    before = [json.loads(line) for line in (root / ANNOTATIONS).read_text().splitlines()]
    report = write_splits(root, seed=5)
    after = [json.loads(line) for line in (root / ANNOTATIONS).read_text().splitlines()]
    assert not list(root.glob("*.tmp"))
    # only the split field changed, and it is what assign_splits gives
    expected = assign_splits(n_objects, seed=5)
    for b, a in zip(before, after, strict=True):
        assert a.pop("split") == expected[a["image_id"]]
        assert a == b
    # object counts per split, recounted from the loaded dataset
    ds = load_dataset(root)
    seen_images: set[str] = set()
    for s in SPLITS:
        part = ds.split(s)
        images = {r.image_id for r in part.records}
        assert not images & seen_images  # no image in two splits
        seen_images |= images
        assert len(part) == sum(n_objects[i] for i in images) == report.objects[s]
        assert len(images) == report.images[s]
    assert seen_images == set(n_objects)
    assert "trace" in str(report)
    # rewriting again with another seed replaces the field instead of adding one
    write_splits(root, seed=6, weight_by="images")
    counts = Counter(r.split for r in load_dataset(root).records)
    assert counts == Counter(assign_splits(list(n_objects), seed=6).values())


def test_write_splits_bad_file(tmp_path):
    (tmp_path / ANNOTATIONS).write_text('{"image_id": "a", "objects": []}\nnot json\n')
    with pytest.raises(Exception, match="line 2"):
        write_splits(tmp_path)
    assert (tmp_path / ANNOTATIONS).read_text().startswith('{"image_id": "a"')  # untouched
