"""Images as the dataset format uses them: decoded in full (truncated files are bad
records), 16-bit pixels scaled to 8 bits, EXIF orientation applied to the image, its size
check and its masks alike; and the small validation cases a new user hits first.

References are computed independently: pixel values with numpy from the array that was
saved, orientations with numpy rotations of the stored bitmap.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mechhi.data.format import DatasetError, check_dataset, load_dataset
from tests.helpers import invoke, invoke_json, one_line_error
from tests.test_dataset_format import SIZES, box_mask, good_lines, rle_json, write_dataset

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def truncate(path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def noisy_png(path, h: int, w: int) -> None:
    """A PNG whose pixel data spans many zlib blocks, so a cut file still has a valid header."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


# ----------------------------------------------------------------------------- item 3: truncated images
def test_a_truncated_image_is_a_bad_record_that_check_names(tmp_path):
    root = write_dataset(tmp_path, good_lines())
    noisy_png(root / "images" / "img1.png", *SIZES["img1"])
    truncate(root / "images" / "img1.png")
    with Image.open(root / "images" / "img1.png") as im:
        assert im.size == SIZES["img1"][::-1]  # the header alone still reads fine
    result = invoke(["dataset", "check", root], exit_code=1)
    assert "line 2 (image 'img1')" in result.stdout and "truncated" in result.stdout
    message = [p.message for p in check_dataset(root)]
    assert len(message) == 1 and "images/img1.png" in message[0] and "truncated" in message[0]
    with pytest.raises(DatasetError, match="line 2 .*img1.*truncated"):
        load_dataset(root)
    kept = load_dataset(root, skip_bad=True)  # --skip-bad: the record is dropped, the rest load
    assert [r.image_id for r in kept.records] == ["img0", "img2"]
    assert all(s.image().size for s in kept)


def test_trace_skip_bad_skips_a_truncated_image(tmp_path):
    from tests.test_trace_job import write_toy_dataset

    from mechhi.models.qwen2_vl import Qwen2VLAdapter
    from mechhi.store import open_store
    from tests.conftest import WORDS

    model = tmp_path / "model"
    Qwen2VLAdapter.build_tiny(model, words=WORDS, layers=2)
    data = tmp_path / "data"
    write_toy_dataset(data, n_images=3)
    noisy = data / "images" / "img001.png"
    image = Image.open(noisy)
    noisy_png(noisy, image.height, image.width)
    truncate(noisy)
    args = ["trace", "--model", model, "--dataset", data, "--device", "cpu"]
    failed = one_line_error(invoke([*args, "--store", tmp_path / "a.zarr"], exit_code=1))
    assert "img001" in failed and "truncated" in failed
    invoke([*args, "--store", tmp_path / "b.zarr", "--skip-bad"])
    ds = open_store(tmp_path / "b.zarr")
    assert "img001" not in set(ds.image_id.values.tolist()) and ds.sizes["sample"] == 2
    assert [s["image_id"] for s in ds.attrs["skipped"]] == ["img001"]


# ----------------------------------------------------------------------------- item 4: 16-bit pixels
def test_a_16_bit_grey_image_is_scaled_to_8_bits(tmp_path):
    from mechhi.data.format import open_image

    ramp = (np.arange(24 * 16).reshape(24, 16) * 171).astype(np.uint16)  # 0 .. 65493
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"  # what Pillow makes of it; its own convert("RGB") clips to white
    rgb = np.asarray(open_image(tmp_path / "g16.png"))
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)
    assert np.unique(rgb).size > 200


def test_a_16_bit_image_in_a_dataset_is_used_scaled(tmp_path):
    root = write_dataset(tmp_path, good_lines())
    h, w = SIZES["img0"]
    values = (np.arange(h * w).reshape(h, w) * 100).astype(np.uint16)
    Image.fromarray(values).save(root / "images" / "img0.png")
    ds = load_dataset(root)
    np.testing.assert_array_equal(np.asarray(ds[0].image())[..., 0], np.rint(values / 257.0).astype(np.uint8))


def test_floating_point_pixels_are_refused_by_name(tmp_path):
    root = write_dataset(tmp_path, good_lines())
    h, w = SIZES["img2"]
    Image.fromarray(np.ones((h, w), np.float32)).save(root / "images" / "img2.tiff")
    lines = good_lines()
    lines[2]["file"] = "images/img2.tiff"
    write_dataset(root, lines)
    problems = [p.message for p in check_dataset(root)]
    assert len(problems) == 1 and "line 3 (image 'img2')" in problems[0] and "floating-point" in problems[0]


# ----------------------------------------------------------------------------- item 4: EXIF orientation
def rotated_png(path, bitmap: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(bitmap).save(path, exif=exif.tobytes())


def test_exif_orientation_is_applied_to_image_size_and_mask(tmp_path):
    """A 20x30 (HxW) bitmap tagged "rotate 90 degrees clockwise" displays as 30x20: the
    record, its mask and the image the model gets are all 30x20, upright."""
    root = write_dataset(tmp_path, good_lines())
    rng = np.random.default_rng(1)
    bitmap = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    rotated_png(root / "images" / "img0.png", bitmap, 6)
    lines = good_lines()
    lines[0].update(width=20, height=30)  # as displayed
    for j, obj in enumerate(lines[0]["objects"]):
        obj["mask"] = rle_json(box_mask(30, 20, (2 + j * 5, 1, 5 + j * 5, 6)))
    write_dataset(root, lines)
    rotated_png(root / "images" / "img0.png", bitmap, 6)  # write_dataset rewrote the image
    ds = load_dataset(root)
    upright = np.rot90(bitmap, k=-1)  # orientation 6: turn 90 degrees clockwise
    np.testing.assert_array_equal(np.asarray(ds[0].image()), upright)
    assert ds[0].mask().shape == (30, 20)
    assert len(ds.notes) == 1 and "EXIF orientation 6" in ds.notes[0].message
    report = invoke_json(["dataset", "check", root])
    assert report["problems"] == [] and "line 1 (image 'img0')" in report["notes"][0]


def test_a_record_sized_like_the_stored_bitmap_of_a_rotated_image_is_bad(tmp_path):
    root = write_dataset(tmp_path, good_lines())
    rotated_png(root / "images" / "img0.png", np.zeros((20, 30, 3), np.uint8), 8)
    problems = [p.message for p in check_dataset(root)]
    assert len(problems) == 1
    assert "is 30x20 upright (EXIF orientation applied) but the record says 20x30" in problems[0]


# ----------------------------------------------------------------------------- item 12: small things
def test_an_empty_annotations_file_is_an_error(tmp_path):
    write_dataset(tmp_path, [])
    with pytest.raises(DatasetError, match="has no records"):
        load_dataset(tmp_path)
    message = one_line_error(invoke(["dataset", "check", tmp_path], exit_code=1))
    assert "annotations.jsonl has no records" in message


def test_building_into_a_different_build_names_the_cli_flag(tmp_path):
    out = tmp_path / "toy"
    invoke(["dataset", "build", "--source", "synthetic", "--out", out, "--n-images", "3"])
    message = one_line_error(invoke(["dataset", "build", "--source", "synthetic", "--out", out, "--n-images", "4"],
                                    exit_code=1))  # fmt: skip
    assert "--overwrite" in message and "overwrite=True" not in message.split("(")[0]
    invoke(["dataset", "build", "--source", "synthetic", "--out", out, "--n-images", "4", "--overwrite"])
    assert len(load_dataset(out).records) == 4


def test_dataset_build_prints_only_its_result_on_stdout(tmp_path):
    result = invoke(["dataset", "build", "--source", "synthetic", "--out", tmp_path / "toy", "--n-images", "3"])
    assert result.stdout.splitlines() == [f"dataset written to {tmp_path / 'toy'}"]
    assert "synthetic images" in result.stderr  # the progress bar
    assert json.loads(invoke(["dataset", "check", tmp_path / "toy", "--json"]).stdout)["images"] == 3
