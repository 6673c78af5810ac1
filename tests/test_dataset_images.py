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
from tests.dataset_files import SIZES, box_mask, good_lines, rle_json, write_dataset
from tests.helpers import invoke, invoke_json, one_line_error

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
    from mechhi.models.tiny import tiny_qwen2_vl
    from mechhi.store import open_store
    from tests.conftest import WORDS
    from tests.toy_dataset import write_toy_dataset

    model = tmp_path / "model"
    tiny_qwen2_vl(model, words=WORDS, layers=2)
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
    message = one_line_error(
        invoke(["dataset", "build", "--source", "synthetic", "--out", out, "--n-images", "4"], exit_code=1)
    )
    assert "--overwrite" in message and "overwrite=True" not in message.split("(")[0]
    invoke(["dataset", "build", "--source", "synthetic", "--out", out, "--n-images", "4", "--overwrite"])
    assert len(load_dataset(out).records) == 4


def test_dataset_build_prints_only_its_result_on_stdout(tmp_path):
    result = invoke(
        ["dataset", "build", "--source", "synthetic", "--out", tmp_path / "toy", "--n-images", "3"]
    )
    assert result.stdout.splitlines() == [f"dataset written to {tmp_path / 'toy'}"]
    assert "synthetic images" in result.stderr  # the progress bar
    assert json.loads(invoke(["dataset", "check", tmp_path / "toy", "--json"]).stdout)["images"] == 3


# ---------------------------------------------------------------------- sizes the model refuses or shrinks
def one_image_dataset(root, images: dict[str, Image.Image]) -> None:
    """A dataset with one object (a box in the middle) per image."""
    from mechhi.data.format import DatasetWriter, ImageRecord, KeyObject

    with DatasetWriter(root) as writer:
        for image_id, image in images.items():
            w, h = image.size
            mask = np.zeros((h, w), bool)
            mask[h // 4 : max(h // 4 + 1, 3 * h // 4), w // 4 : max(w // 4 + 1, 3 * w // 4)] = True
            objects = (KeyObject.from_mask("0", "a red square", mask),)
            writer.add(ImageRecord(image_id, "", w, h, None, objects), image)


def test_an_image_the_processor_refuses_is_a_bad_record_that_check_finds_and_trace_skips(tmp_path):
    from mechhi.models.tiny import tiny_qwen2_vl
    from mechhi.store import open_store
    from tests.conftest import WORDS

    data = tmp_path / "data"
    one_image_dataset(
        data,
        {
            "wide": Image.new("RGB", (2000, 1), "red"),
            "fine": Image.new("RGB", (84, 56), "red"),
            "also": Image.new("RGB", (56, 84), "blue"),
        },
    )
    checked = invoke(["dataset", "check", data], exit_code=1)  # default model: the bundled toy (a Qwen2-VL)
    bad = [line for line in checked.stdout.splitlines() if line.startswith("bad")]
    assert len(bad) == 1 and "line 1 (image 'wide')" in bad[0] and "refuses a 1x2000 image" in bad[0]
    assert "aspect ratio must be smaller than 200" in bad[0] and "no problems" not in checked.stdout
    model = tmp_path / "model"
    tiny_qwen2_vl(model, words=WORDS, layers=2)
    problems = invoke_json(["dataset", "check", data, "--model", model], exit_code=1)["problems"]
    assert problems == [bad[0].removeprefix("bad ")]
    args = ["trace", "--model", model, "--dataset", data, "--device", "cpu"]
    failed = one_line_error(invoke([*args, "--store", tmp_path / "a.zarr"], exit_code=1))
    assert "image 'wide'" in failed and "aspect ratio" in failed
    invoke([*args, "--store", tmp_path / "b.zarr", "--skip-bad"])
    ds = open_store(tmp_path / "b.zarr")
    assert ds.image_id.values.tolist() == ["fine", "also"]
    assert [s["image_id"] for s in ds.attrs["skipped"]] == ["wide"]


def test_a_large_image_is_one_note_and_is_decoded_reduced_to_what_the_processor_uses(tmp_path, monkeypatch):
    """Pillow's bomb limit lowered to 0.2 Mpx: a 600x600 image is "large", a 700x700 one
    (over twice the limit) a bomb. The large one is noted in one line naming its record and
    reaches the processor decoded reduced, its boxes still in full-size pixels."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    from mechhi.data.format import ORIGINAL_SIZE, open_image
    from tests.conftest import tiny

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)
    rng = np.random.default_rng(0)
    big = rng.integers(0, 255, (600, 600, 3), dtype=np.uint8)
    data = tmp_path / "data"
    one_image_dataset(data, {"small": Image.new("RGB", (56, 56), "red"), "big": Image.fromarray(big)})
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(data / "images" / "big.png")  # what Pillow alone says, in several lines
    checked = invoke(["dataset", "check", data])
    assert "DecompressionBomb" not in checked.output and "no problems" in checked.stdout
    notes = [line for line in checked.stdout.splitlines() if line.startswith("note")]
    assert len(notes) == 1 and "line 2 (image 'big')" in notes[0] and "600x600 (0.36 Mpx" in notes[0]

    _, adapter = tiny("qwen2-vl", "gqa")
    size = adapter.processor.image_processor.size
    target_h, target_w = smart_resize(
        600, 600, factor=28, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"]
    )
    image = open_image(data / "images" / "big.png", use=adapter)
    factor = 600 // image.width
    assert image.size == (600 // factor, 600 // factor) and image.info[ORIGINAL_SIZE] == (600, 600)
    assert factor >= 2 and image.width >= target_w  # reduced, not below what the processor resizes to
    blocks = big.reshape(600 // factor, factor, 600 // factor, factor, 3).mean(
        (1, 3)
    )  # the reference: block means
    assert np.abs(np.asarray(image, float) - blocks).max() <= 1
    layout = adapter.prepare([image], ["a red square"]).layouts[0]
    assert layout.views[0].box == (0.0, 0.0, 600.0, 600.0)  # where the full-size mask is
    assert layout.views[0].grid == adapter.grid_sizes((600, 600))["image"] == (target_h // 28, target_w // 28)
    jpeg = tmp_path / "big.jpg"
    Image.fromarray(big).save(jpeg, quality=95)
    drafted = open_image(jpeg, use=adapter)
    assert (
        drafted.width in (300, 150, 75)
        and drafted.width >= target_w
        and drafted.info[ORIGINAL_SIZE] == (600, 600)
    )

    Image.fromarray(np.zeros((700, 700, 3), np.uint8)).save(
        data / "images" / "big.png"
    )  # over twice the limit
    lines = [json.loads(line) for line in (data / "annotations.jsonl").read_text().splitlines()]
    lines[1]["width"] = lines[1]["height"] = 700
    lines[1]["objects"][0]["mask"] = rle_json(box_mask(700, 700, (100, 100, 300, 300)))
    (data / "annotations.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    bombed = invoke(["dataset", "check", data], exit_code=1)
    bad = [line for line in bombed.stdout.splitlines() if line.startswith("bad")]
    assert len(bad) == 1 and "image 'big'" in bad[0] and "decompression bomb" in bad[0].lower()
