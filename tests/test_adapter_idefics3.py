"""Idefics3 / SmolVLM adapter: token grids, token order, description positions, reload.

The tiny "tiles" model has 84 px tiles of 6x6 patches (14 px), pixel-shuffled 2x2 into
3x3 tokens of 28 px each; images are resized to a longest edge of 168 px (2 tiles).
Images of 168 x 168, 84 x 168 and 168 x 84 px are therefore not resized at all, and the
expected cells below are computed by hand from pixel coordinates.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from mechhi.models import AdapterError, adapter_for
from mechhi.models.idefics3 import Idefics3Adapter, tile_marker
from mechhi.models.tiny import tiny_idefics3
from tests.conftest import WORDS, noise_image, tiny

TOKEN_PX = 28  # one mosaic token in pixels (tiles case, unresized images)
K = 3  # tokens per tile side (tiles case)


def positions_of(batch, token: str, adapter) -> np.ndarray:
    ids = batch.inputs["input_ids"][0].numpy()
    return np.flatnonzero(ids == adapter.tokenizer.convert_tokens_to_ids(token))


# ----------------------------------------------------------------------------- masks


def test_mask_on_one_token_lands_on_its_cell_in_mosaic_and_global():
    _, adapter = tiny("idefics3", "tiles")
    batch = adapter.prepare([noise_image(168, 168)], ["a red circle"])
    mosaic, global_ = batch.layouts[0].view("image"), batch.layouts[0].view("global")
    assert mosaic.grid == (6, 6) and global_.grid == (3, 3)

    # Mosaic cell (1, 4): pixels y 28..56, x 112..140; tile (0, 1) = <row_1_col_2>, in-tile (1, 1).
    mask = np.zeros((168, 168), bool)
    mask[28:56, 112:140] = True
    cover = mosaic.coverage(mask)
    expected = np.zeros((6, 6))
    expected[1, 4] = 1.0
    np.testing.assert_allclose(cover, expected, atol=1e-12)
    (marker,) = positions_of(batch, tile_marker(0, 1), adapter)
    assert mosaic.positions[1 * 6 + 4] == marker + 1 + (1 * K + 1)
    # The same pixels are a quarter of global cell (0, 2) (56 px cells).
    expected_global = np.zeros((3, 3))
    expected_global[0, 2] = 0.25
    np.testing.assert_allclose(global_.coverage(mask), expected_global, atol=1e-12)


def test_mask_on_one_global_cell_spans_two_tiles():
    _, adapter = tiny("idefics3", "tiles")
    batch = adapter.prepare([noise_image(168, 168)], ["a red circle"])
    mosaic, global_ = batch.layouts[0].view("image"), batch.layouts[0].view("global")
    mask = np.zeros((168, 168), bool)
    mask[56:112, 112:168] = True  # global cell (1, 2)
    expected_global = np.zeros((3, 3))
    expected_global[1, 2] = 1.0
    np.testing.assert_allclose(global_.coverage(mask), expected_global, atol=1e-12)
    (tag,) = positions_of(batch, "<global-img>", adapter)
    assert global_.positions[1 * 3 + 2] == tag + 1 + (1 * K + 2)
    expected = np.zeros((6, 6))
    expected[2:4, 4:6] = 1.0
    np.testing.assert_allclose(mosaic.coverage(mask), expected, atol=1e-12)
    # Mosaic row 3 is tile row 1: cell (3, 4) is tile (1, 1) = <row_2_col_2>, in-tile (0, 1).
    (marker,) = positions_of(batch, tile_marker(1, 1), adapter)
    assert mosaic.positions[3 * 6 + 4] == marker + 1 + (0 * K + 1)


def test_resized_image_grid_spans_the_whole_image():
    """100 x 140 px is stretched to 168 x 168: the left half of the image is 3 of 6 columns."""
    _, adapter = tiny("idefics3", "tiles")
    batch = adapter.prepare([noise_image(100, 140)], ["a red circle"])
    mask = np.zeros((100, 140), bool)
    mask[:, :70] = True
    mosaic, global_ = batch.layouts[0].view("image"), batch.layouts[0].view("global")
    assert mosaic.box == global_.box == (0.0, 0.0, 140.0, 100.0)
    np.testing.assert_allclose(mosaic.coverage(mask), np.repeat([[1, 1, 1, 0, 0, 0]], 6, 0), atol=1e-12)
    np.testing.assert_allclose(global_.coverage(mask), np.repeat([[1, 0.5, 0]], 3, 0), atol=1e-12)


# ----------------------------------------------------------------------------- token order


def coded_image(height: int, width: int, rows: int, cols: int) -> Image.Image:
    """Block (r, c) of a rows x cols grid painted (40 + 30 r, 40 + 30 c, 200)."""
    r = np.repeat(np.arange(rows), height // rows)[:, None]
    c = np.repeat(np.arange(cols), width // cols)[None, :]
    pixels = np.stack(np.broadcast_arrays(40 + 30 * r, 40 + 30 * c, np.full_like(r + c, 200)), -1)
    return Image.fromarray(pixels.astype(np.uint8))


def decode(block: torch.Tensor) -> tuple[int, int]:
    """The (r, c) code of a normalised (3, h, w) pixel block, read from its centre."""
    h, w = block.shape[1:]
    centre = block[:, h // 4 : h - h // 4, w // 4 : w - w // 4].mean((1, 2))
    red, green, blue = ((centre * 0.5 + 0.5) * 255).tolist()  # undo rescale + normalise(0.5, 0.5)
    assert abs(blue - 200) < 8, "not a painted block"
    return round((red - 40) / 30), round((green - 40) / 30)


def pixel_block(batch, adapter, position: int) -> torch.Tensor:
    """The pixels behind the visual token at sequence ``position``.

    Independent of the adapter: the model scatters its images' features into the
    ``<image>`` positions in sequence order, images in ``pixel_values`` order, and the
    pixel shuffle keeps row-major order inside an image (checked below).
    """
    image_positions = adapter.image_token_positions(batch.inputs, 0)
    rank = int(np.flatnonzero(image_positions == position)[0])
    image, j = divmod(rank, adapter.image_seq_len)
    k = adapter.tile_side
    px = batch.inputs["pixel_values"].shape[-1] // k
    row, col = divmod(j, k)
    return batch.inputs["pixel_values"][0, image, :, row * px : (row + 1) * px, col * px : (col + 1) * px]


@pytest.mark.parametrize("height,width", [(168, 168), (84, 168), (168, 84)])
def test_mosaic_cell_shows_its_pixels(height, width):
    _, adapter = tiny("idefics3", "tiles")
    rows, cols = height // TOKEN_PX, width // TOKEN_PX
    batch = adapter.prepare([coded_image(height, width, rows, cols)], ["a red circle"])
    mosaic = batch.layouts[0].view("image")
    assert mosaic.grid == (rows, cols)
    for cell, position in enumerate(mosaic.positions):
        assert decode(pixel_block(batch, adapter, position)) == divmod(cell, cols)


@pytest.mark.parametrize("height,width", [(168, 168), (84, 168)])
def test_global_cell_shows_its_pixels(height, width):
    _, adapter = tiny("idefics3", "tiles")
    batch = adapter.prepare([coded_image(height, width, K, K)], ["a red circle"])
    view = batch.layouts[0].view("global")
    assert view.grid == (K, K)
    for cell, position in enumerate(view.positions):
        assert decode(pixel_block(batch, adapter, position)) == divmod(cell, K)


def test_pixel_shuffle_is_row_major_within_a_tile():
    """The assumption `pixel_block` and the adapter share, checked on the model's own code."""
    model, adapter = tiny("idefics3", "tiles")
    side, s = 6, model.config.scale_factor  # patches per tile side, shuffle factor
    patch_index = torch.arange(side * side, dtype=torch.float32)
    features = patch_index[None, :, None].repeat(1, 1, 4)  # (1, patches, dim): feature = patch index
    shuffled = model.model.connector.pixel_shuffle(features, s)  # (1, k*k, dim * s*s)
    for j in range(adapter.image_seq_len):
        row, col = divmod(j, adapter.tile_side)
        patches = {(int(p) // side, int(p) % side) for p in shuffled[0, j].tolist()}
        assert patches == {(row * s + a, col * s + b) for a in range(s) for b in range(s)}


# ----------------------------------------------------------------------------- description


def test_description_positions_decode_to_the_description():
    _, adapter = tiny("idefics3", "tiles")
    descriptions = ["a red circle", "blue square", "a small green star"]
    images = [noise_image(h, w, seed=i) for i, (h, w) in enumerate([(100, 140), (168, 168), (84, 300)])]
    batch = adapter.prepare(images, descriptions)
    for i, (layout, text) in enumerate(zip(batch.layouts, descriptions)):
        tokens = batch.inputs["input_ids"][i, layout.query_positions].tolist()
        assert adapter.tokenizer.decode(tokens) == text
    # Different tile counts per sample, one padded batch.
    assert [layout.view("image").grid for layout in batch.layouts] == [(6, 6), (6, 6), (3, 6)]


# ----------------------------------------------------------------------------- views


@pytest.mark.parametrize("case,names", [("tiles", ("image", "global")), ("unsplit", ("image",))])
def test_view_set_is_fixed_by_the_processor(case, names):
    _, adapter = tiny("idefics3", case)
    assert adapter.view_names() == names
    images = [noise_image(h, w, seed=i) for i, (h, w) in enumerate([(30, 40), (168, 168), (84, 300)])]
    batch = adapter.prepare(images, ["a red circle"] * 3)
    for layout in batch.layouts:
        assert tuple(v.name for v in layout.views) == names
    if case == "unsplit":  # the only image is the global one, after its <global-img> tag
        (tag,) = positions_of(batch, "<global-img>", adapter)
        np.testing.assert_array_equal(batch.layouts[0].view("image").positions, tag + 1 + np.arange(9))


def test_seq_len_mismatch_is_refused():
    model, adapter = tiny("idefics3", "tiles")
    processor = copy.copy(adapter.processor)
    processor.image_seq_len = 16
    with pytest.raises(AdapterError, match="image_seq_len=16"):
        Idefics3Adapter(model.config, processor)


# ----------------------------------------------------------------------------- reload


def test_save_reload_round_trip(tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model, processor = tiny_idefics3(tmp_path, words=WORDS)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    adapter = adapter_for(reloaded.config, AutoProcessor.from_pretrained(tmp_path))
    assert isinstance(adapter, Idefics3Adapter)
    images = [noise_image(100, 140), noise_image(84, 300, seed=1)]
    batch = adapter.prepare(images, ["a red circle", "blue square"])
    before = Idefics3Adapter(model.config, processor).prepare(images, ["a red circle", "blue square"])
    torch.testing.assert_close(batch.inputs["input_ids"], before.inputs["input_ids"], rtol=0, atol=0)
    for a, b in zip(batch.layouts, before.layouts):
        np.testing.assert_array_equal(a.query_positions, b.query_positions)
        for va, vb in zip(a.views, b.views):
            assert (va.name, va.grid, va.box) == (vb.name, vb.grid, vb.box)
            np.testing.assert_array_equal(va.positions, vb.positions)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch.inputs).logits, model(**before.inputs).logits)


@pytest.mark.parametrize("case", ["tiles", "smolvlm"])
def test_adapter_for_picks_idefics3(case):
    model, adapter = tiny("idefics3", case)
    assert model.config.model_type == {"tiles": "idefics3", "smolvlm": "smolvlm"}[case]
    assert type(adapter_for(model.config, adapter.processor)) is Idefics3Adapter
    layers = model
    for part in Idefics3Adapter.decoder_layers.split("."):
        layers = getattr(layers, part)
    assert len(layers) == adapter.n_layers
