"""The dataset format: RLE masks, validation with one-line messages, resumable writing.

The test datasets are written by hand (tests/dataset_files.py: json + PIL + pycocotools
directly), not with `DatasetWriter`, so the loader is checked against an independent writer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from mechhi.data.format import (
    DatasetError,
    DatasetWriter,
    ImageRecord,
    KeyObject,
    check_dataset,
    decode_mask,
    encode_mask,
    load_dataset,
    rle_counts,
)
from tests.dataset_files import SIZES, box_mask, good_lines, rle_json, write_dataset

# pycocotools' own decode warns under numpy 2 (its __array__ lacks `copy`); harmless
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# ----------------------------------------------------------------------------- RLE


def runs_by_hand(mask: np.ndarray) -> list[int]:
    """Run lengths of the column-major flattening, starting with a (maybe empty) 0-run."""
    flat = mask.flatten(order="F").astype(int)
    runs, value, n = [], 0, 0
    for v in flat:
        if v == value:
            n += 1
        else:
            runs.append(n)
            value, n = v, 1
    runs.append(n)
    return runs


def random_masks(seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = [(1, 1), (1, 17), (13, 1), (7, 11), (31, 5), (224, 224), (101, 67)]
    for h, w in shapes:
        for density in (0.0, 0.03, 0.5, 0.97, 1.0):
            yield rng.random((h, w)) < density
    blob = np.zeros((57, 43), bool)
    blob[10:40, 5:30] = True  # long runs exercise the multi-character delta encoding
    yield blob


@pytest.mark.parametrize("mask", list(random_masks()), ids=lambda m: f"{m.shape}-{m.sum()}")
def test_rle_round_trip_and_pycocotools_agreement(mask):
    rle = encode_mask(mask)
    assert isinstance(rle["counts"], str)
    assert rle["size"] == list(mask.shape)
    json.dumps(rle)  # must be JSON-serialisable as-is
    back = decode_mask(rle)
    assert back.dtype == bool and back.shape == mask.shape
    np.testing.assert_array_equal(back, mask)
    # pycocotools reads our string back to the same mask, and we read its encoding
    ref = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    np.testing.assert_array_equal(ref.astype(bool), mask)
    theirs = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    np.testing.assert_array_equal(decode_mask(theirs), mask)
    # our Python run decoder agrees with runs counted by hand
    assert rle_counts(rle["counts"]) == runs_by_hand(mask)


def test_uncompressed_rle_is_accepted():
    mask = np.zeros((4, 3), bool)
    mask[1:3, 1] = True
    rle = {"size": [4, 3], "counts": runs_by_hand(mask)}
    np.testing.assert_array_equal(decode_mask(rle), mask)


@pytest.mark.parametrize(
    "rle, fragment",
    [
        ({"size": [3, 4], "counts": "02"}, "cover 2 pixels"),  # pycocotools would read garbage
        ({"size": [3, 4], "counts": "0"}, "cover 0 pixels"),
        ({"size": [3, 4], "counts": "0;"}, "cover 11 pixels"),
        ({"size": [3], "counts": "0<"}, "size must be"),
        ({"counts": "0<"}, "'size' and 'counts'"),
        ({"size": [3, 4], "counts": 5}, "counts must be"),
    ],
)
def test_malformed_rle_is_rejected(rle, fragment):
    with pytest.raises(ValueError, match=fragment):
        decode_mask(rle)


# ----------------------------------------------------------------------------- a dataset


def test_good_dataset_loads(tmp_path):
    ds = load_dataset(write_dataset(tmp_path, good_lines()))
    assert len(ds) == 6 and len(ds.records) == 3 and ds.skipped == []
    assert [s.index for s in ds] == list(range(6))
    assert [(s.image_id, s.object_id) for s in ds][:3] == [("img0", "0"), ("img0", "1"), ("img1", "0")]
    s = ds[2]
    assert s.description == "a thing number 0" and s.obj.attributes == {"n": "0"}
    h, w = SIZES["img1"]
    assert s.image().mode == "RGB" and s.image().size == (w, h)
    np.testing.assert_array_equal(s.mask(), box_mask(h, w, (2, 1, 5, 7)))
    assert s.record.questions[0]["answer"] == 0 and s.record.split == "train"
    # splits: by record, re-indexed from 0
    train = ds.split("train")
    assert [s.image_id for s in train] == ["img1", "img1"] and train[1].index == 1
    assert [s.image_id for s in load_dataset(tmp_path, split="test")] == ["img2", "img2"]
    assert check_dataset(tmp_path) == []


def test_fingerprint_follows_content(tmp_path):
    root = write_dataset(tmp_path, good_lines())
    fp = load_dataset(root).fingerprint
    assert fp == load_dataset(root).fingerprint and len(fp) == 16
    Image.new("RGB", (30, 20), (1, 2, 3)).save(root / "images" / "img0.png", compress_level=0)
    fp2 = load_dataset(root).fingerprint
    assert fp2 != fp  # same size and annotations, different image bytes on disk
    lines = good_lines()
    lines[0]["caption"] = "changed"
    write_dataset(root, lines)
    assert load_dataset(root).fingerprint not in (fp, fp2)


def _edit(line: int, fn):
    """A case: apply ``fn`` to the dict of line ``line`` (1-based) before writing."""

    def make(root: Path) -> list:
        lines = good_lines()
        out = fn(lines[line - 1], root)
        lines[line - 1] = lines[line - 1] if out is None else out
        return lines

    return make


def _set_obj(j, key, value):
    def fn(rec, root):
        rec["objects"][j][key] = value

    return fn


def _missing_image(rec, root):
    rec["file"] = "images/nowhere.png"


def _resized_image(rec, root):
    Image.new("RGB", (5, 7)).save(root / rec["file"])  # written after write_dataset's images


# (name, case, count_tokens limit, line, image, object or None for the whole image, reason)
BAD = [
    ("missing image", _edit(2, _missing_image), None, 2, "img1", None, "does not exist"),
    ("image size", _edit(2, _resized_image), None, 2, "img1", None, "is 7x5 but the record says 24x16"),
    (
        "mask size",
        _edit(2, _set_obj(1, "mask", rle_json(np.ones((16, 24), bool)))),
        None,
        2,
        "img1",
        "1",
        "mask is 16x24 but the image is 24x16",
    ),
    (
        "empty mask",
        _edit(3, _set_obj(0, "mask", rle_json(np.zeros((18, 18), bool)))),
        None,
        3,
        "img2",
        "0",
        "mask is empty",
    ),
    (
        "short RLE",
        _edit(3, _set_obj(0, "mask", {"size": [18, 18], "counts": "02"})),
        None,
        3,
        "img2",
        "0",
        "cover 2 pixels",
    ),
    (
        "empty description",
        _edit(1, _set_obj(1, "description", "  ")),
        None,
        1,
        "img0",
        "1",
        "description is empty",
    ),
    (
        "long description",
        _edit(1, _set_obj(0, "description", "one two three four five six")),
        5,
        1,
        "img0",
        "0",
        "6 tokens, more than the limit of 5",
    ),
    (
        "duplicate object",
        _edit(2, _set_obj(1, "object_id", "0")),
        None,
        2,
        "img1",
        "0",
        "duplicate object_id",
    ),
    (
        "missing key",
        _edit(2, lambda rec, root: rec.pop("width") and None),
        None,
        2,
        "img1",
        None,
        "missing key(s) width",
    ),
    (
        "duplicate image",
        _edit(3, lambda rec, root: rec.update(image_id="img0")),
        None,
        3,
        "img0",
        None,
        "duplicate image_id",
    ),
    (
        "bad split",
        _edit(3, lambda rec, root: rec.update(split="holdout")),
        None,
        3,
        "img2",
        None,
        "split must be one of",
    ),
    ("malformed JSON", _edit(2, lambda rec, root: json.dumps(rec)[:-7]), None, 2, None, None, "invalid JSON"),
]


def _write_bad(root: Path, case) -> None:
    write_dataset(root, [])  # images first, so a case may overwrite one
    lines = case(root)
    text = "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines)
    (root / "annotations.jsonl").write_text(text)


@pytest.mark.parametrize("name, case, limit, line, image, obj, reason", BAD, ids=[b[0] for b in BAD])
def test_bad_record_raises_one_line_message(tmp_path, name, case, limit, line, image, obj, reason):
    _write_bad(tmp_path, case)
    kw = {"count_tokens": lambda s: len(s.split()), "max_description_tokens": limit} if limit else {}
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"annotations.jsonl line {line}")
    if image is not None:
        assert f"image '{image}'" in msg
    if obj is not None:
        assert f"object '{obj}'" in msg
    assert reason in msg


@pytest.mark.parametrize("name, case, limit, line, image, obj, reason", BAD, ids=[b[0] for b in BAD])
def test_skip_bad_keeps_the_good_samples(tmp_path, name, case, limit, line, image, obj, reason):
    _write_bad(tmp_path, case)
    kw = {"count_tokens": lambda s: len(s.split()), "max_description_tokens": limit} if limit else {}
    ds = load_dataset(tmp_path, skip_bad=True, **kw)
    assert len(ds.skipped) == 1
    (skip,) = ds.skipped
    assert (skip.line, skip.image_id, skip.object_id) == (line, image, obj)
    assert reason in skip.reason
    kept = {(s.image_id, s.object_id) for s in ds}
    all_pairs = {(i, str(j)) for i in SIZES for j in range(2)}
    if name == "duplicate object":  # the second copy of "0" (formerly "1") is dropped
        assert kept == all_pairs - {("img1", "1")}
    elif name == "duplicate image":  # the second "img0" is dropped, so img2's line is gone
        assert kept == all_pairs - {("img2", "0"), ("img2", "1")}
    elif obj is not None:  # only the bad object is dropped
        assert kept == all_pairs - {(image, obj)}
    else:  # the whole image of that line is dropped
        assert kept == {p for p in all_pairs if p[0] != list(SIZES)[line - 1]}
    assert check_dataset(tmp_path, **kw) == ds.skipped


def test_question_of_a_skipped_object_is_dropped(tmp_path):
    lines = good_lines()
    lines[0]["objects"][0]["description"] = ""
    ds = load_dataset(write_dataset(tmp_path, lines), skip_bad=True)
    assert ds.records[0].questions == ()  # it asked about object "0"
    assert len(ds.records[1].questions) == 1


def test_missing_directory_and_annotations(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="has no annotations.jsonl"):
        load_dataset(tmp_path)


def test_check_images_false_does_not_need_images(tmp_path):
    write_dataset(tmp_path, good_lines())
    for p in (tmp_path / "images").iterdir():
        p.unlink()
    assert len(load_dataset(tmp_path, check_images=False)) == 6
    assert {s.reason.split(" does")[0] for s in check_dataset(tmp_path)} == {
        f"image file images/{i}.png" for i in SIZES
    }


# ----------------------------------------------------------------------------- writer


def make_record(i: int) -> tuple[ImageRecord, Image.Image]:
    h, w = 12 + i, 10
    obj = KeyObject.from_mask("0", f"thing {i}", box_mask(h, w, (1, 1, 4, 4 + i)), {"i": str(i)})
    rec = ImageRecord(f"{i:03d}", "", w, h, f"caption {i}", (obj,), split="train")
    return rec, Image.new("RGB", (w, h), (i, 2 * i, 3 * i))


def test_writer_resumes_after_a_crash(tmp_path):
    w = DatasetWriter(tmp_path)
    for i in range(3):
        w.add(*make_record(i))
    # "crash": no close(); the process died while writing record 3
    with (tmp_path / "annotations.jsonl").open("ab") as fh:
        fh.write(b'{"image_id": "003", "fi')
    w2 = DatasetWriter(tmp_path)
    assert w2.done_ids == {"000", "001", "002"}
    with w2:
        for i in range(6):
            rec, image = make_record(i)
            if rec.image_id not in w2.done_ids:
                w2.add(rec, image)
    lines = (tmp_path / "annotations.jsonl").read_text().splitlines()
    ids = [json.loads(ln)["image_id"] for ln in lines]
    assert ids == [f"{i:03d}" for i in range(6)]
    ds = load_dataset(tmp_path)
    assert ds.skipped == [] and len(ds) == 6
    for i, s in enumerate(ds):
        rec, image = make_record(i)
        assert s.record.file == f"images/{i:03d}.png"
        assert np.array_equal(np.asarray(s.image()), np.asarray(image))
        np.testing.assert_array_equal(s.mask(), rec.objects[0].mask())
    w.close()  # the "crashed" writer's handle, only so the test leaks no file


def test_writer_refuses_duplicates_and_bad_sizes(tmp_path):
    with DatasetWriter(tmp_path) as w:
        rec, image = make_record(0)
        w.add(rec, image)
        with pytest.raises(DatasetError, match="already in"):
            w.add(rec, image)
        rec1, image1 = make_record(1)
        with pytest.raises(DatasetError, match="image is 12x10 but the record says 13x10"):
            w.add(rec1, image)
        with pytest.raises(DatasetError, match="not usable as a file name"):
            w.add(ImageRecord("../x", "", 10, 12, None, ()), image)
    assert len((tmp_path / "annotations.jsonl").read_text().splitlines()) == 1


def test_writer_copies_image_files_and_overwrites(tmp_path):
    src = tmp_path / "src.JPG"
    rec, image = make_record(2)
    image.save(src, format="PNG")  # the suffix is kept (lower-cased), content copied as is
    with DatasetWriter(tmp_path / "ds") as w:
        w.add(rec, src)
    assert (tmp_path / "ds" / "images" / "002.jpg").read_bytes() == src.read_bytes()
    with DatasetWriter(tmp_path / "ds", overwrite=True) as w:
        assert w.done_ids == set()
        w.add(*make_record(4))
    assert [s.image_id for s in load_dataset(tmp_path / "ds")] == ["004"]
