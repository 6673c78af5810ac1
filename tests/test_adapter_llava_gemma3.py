"""LLaVA-1.5 and Gemma 3 adapters: token-grid geometry, description tokens, attention
masks, save/reload.

Independent references: crop boxes and grid cells computed by hand below; the
processor's own ``pixel_values`` (paint a cell of the original image, find which
patch lights up); the model's own eager attention matrices.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mechhi.models import AdapterError, adapter_for
from mechhi.models._common import box_coverage
from mechhi.models.gemma3 import Gemma3Adapter
from mechhi.models.llava import LlavaAdapter, crop_box
from mechhi.models.tiny import build_tiny
from mechhi.trace import AttentionTracer
from tests.conftest import WORDS, noise_image, tiny

DESCRIPTIONS = ["a red circle", "blue square", "a small green star"]


def cell_rect(box, grid, r, c, inset=0.0):
    """Pixel rectangle (x0, y0, x1, y1) of grid cell (r, c) inside ``box``, shrunk by ``inset``."""
    x0, y0, x1, y1 = box
    rows, cols = grid
    w, h = (x1 - x0) / cols, (y1 - y0) / rows
    return (x0 + c * w + inset, y0 + r * h + inset, x0 + (c + 1) * w - inset, y0 + (r + 1) * h - inset)


def painted(width, height, rect) -> Image.Image:
    """Black image with a white rectangle (pixel rows/cols whose centres fall inside ``rect``)."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    x0, y0, x1, y1 = (round(v) for v in rect)
    array[max(y0, 0) : y1, max(x0, 0) : x1] = 255
    return Image.fromarray(array)


def patch_brightness(pixel_values: torch.Tensor, grid) -> np.ndarray:
    """(rows, cols) mean of channel 0 over each token's square of ``pixel_values`` (C, H, W)."""
    rows, cols = grid
    channel = pixel_values[0].float().numpy()
    h, w = channel.shape
    return channel.reshape(rows, h // rows, cols, w // cols).mean(axis=(1, 3))


def llava_with_image_processor(image_processor) -> LlavaAdapter:
    """The tiny LLaVA adapter, its processor's image processor swapped for another config."""
    from transformers import LlavaProcessor

    _, adapter = tiny("llava", "gqa")
    old = adapter.processor
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=old.tokenizer,
        patch_size=old.patch_size,
        vision_feature_select_strategy=old.vision_feature_select_strategy,
        num_additional_image_tokens=old.num_additional_image_tokens,
        chat_template=old.chat_template,
    )
    return LlavaAdapter(adapter.config, processor)


# ----------------------------------------------------------------------------- LLaVA geometry


def test_llava_crop_box_by_hand():
    # 140x100 image, shortest edge 100 -> 70 (x0.7): 98x70; centre crop 56 at left 21, top 7.
    # In original pixels: x 21/0.7=30 .. 77/0.7=110, y 7/0.7=10 .. 63/0.7=90; patch 14 -> 20 px.
    _, adapter = tiny("llava", "gqa")
    layout = adapter.prepare([noise_image(100, 140)], ["a red circle"]).layouts[0]
    view = layout.view("image")
    assert view.grid == (4, 4)
    np.testing.assert_allclose(view.box, (30.0, 10.0, 110.0, 90.0), atol=1e-9)
    mask = np.zeros((100, 140), dtype=bool)
    mask[10 + 20 * 1 : 10 + 20 * 2, 30 + 20 * 2 : 30 + 20 * 3] = True  # exactly cell (1, 2)
    expected = np.zeros((4, 4))
    expected[1, 2] = 1.0
    np.testing.assert_allclose(view.coverage(mask), expected, atol=1e-9)
    # A grid laid over the whole image would not put the object on one cell: the crop matters.
    whole = box_coverage(mask, (0.0, 0.0, 140.0, 100.0), (4, 4))
    assert not np.allclose(whole, expected, atol=0.1)


def test_llava_portrait_wide_crop_and_padded_boxes_by_hand():
    from transformers import CLIPImageProcessor, LlavaImageProcessor

    crop = {"height": 56, "width": 56}
    wide = CLIPImageProcessor(size={"shortest_edge": 84}, crop_size=crop)
    # 120x240 (w x h): width 120 -> 84 (x0.7), height int(84*2)=168; crop left 14, top 56.
    np.testing.assert_allclose(crop_box((120, 240), wide), (20.0, 80.0, 100.0, 160.0), atol=1e-9)
    padded = LlavaImageProcessor(size={"shortest_edge": 84}, crop_size=crop, do_pad=True)
    # 120x240 padded to 240x240 (60 px left and right), -> 84 (x0.35), crop 14..70 -> 40..200,
    # minus the 60 px pad on x: the box sticks out of the image, where coverage counts 0.
    np.testing.assert_allclose(crop_box((120, 240), padded), (-20.0, 40.0, 140.0, 200.0), atol=1e-9)
    squash = CLIPImageProcessor(size={"height": 56, "width": 56}, do_center_crop=False)
    np.testing.assert_allclose(crop_box((120, 240), squash), (0.0, 0.0, 120.0, 240.0), atol=1e-9)


def test_llava_boxes_differ_but_grids_agree_across_sizes():
    _, adapter = tiny("llava", "gqa")
    sizes = [(100, 140), (224, 224), (84, 300)]
    batch = adapter.prepare([noise_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)], DESCRIPTIONS)
    views = [layout.view("image") for layout in batch.layouts]
    assert {v.grid for v in views} == {(4, 4)}
    assert len({v.box for v in views}) == 3


@pytest.mark.parametrize(
    "config",
    [
        {"kind": "clip"},
        {"kind": "clip", "size": {"shortest_edge": 84}},
        {"kind": "llava", "do_pad": True},
        {"kind": "clip", "size": {"height": 56, "width": 56}, "do_center_crop": False},
    ],
    ids=["clip-crop", "clip-wide-crop", "llava-pad-square", "squash-no-crop"],
)
@pytest.mark.parametrize("size", [(300, 200), (180, 320)], ids=["landscape", "portrait"])
@pytest.mark.parametrize("cell", [(0, 0), (1, 2), (3, 1)])
def test_llava_painted_cell_lands_on_its_patch(config, size, cell):
    """Paint the cell the adapter maps to (r, c); the processor must put it in patch (r, c)."""
    from transformers import CLIPImageProcessor, LlavaImageProcessor

    config = dict(config)
    kind = config.pop("kind")
    kwargs = {"size": {"shortest_edge": 70}, "crop_size": {"height": 56, "width": 56}, **config}
    image_processor = (CLIPImageProcessor if kind == "clip" else LlavaImageProcessor)(**kwargs)
    adapter = llava_with_image_processor(image_processor)
    width, height = size
    view = adapter.prepare([noise_image(height, width)], ["a red circle"]).layouts[0].view("image")
    image = painted(width, height, cell_rect(view.box, view.grid, *cell, inset=3))
    batch = adapter.prepare([image], ["a red circle"])
    brightness = patch_brightness(batch.inputs["pixel_values"][0], view.grid)
    assert np.unravel_index(brightness.argmax(), brightness.shape) == cell
    others = np.delete(brightness.ravel(), np.ravel_multi_index(cell, view.grid))
    assert brightness[cell] - others.max() > 1.0, brightness


def test_llava_refuses_padded_crop_and_unknown_size():
    from transformers import CLIPImageProcessor

    small = CLIPImageProcessor(size={"shortest_edge": 42}, crop_size={"height": 56, "width": 56})
    with pytest.raises(AdapterError, match="larger than the resized image"):
        crop_box((100, 140), small)
    odd = CLIPImageProcessor(
        size={"shortest_edge": 56, "longest_edge": 90}, crop_size={"height": 56, "width": 56}
    )
    with pytest.raises(AdapterError, match="unsupported image-processor size"):
        crop_box((100, 140), odd)


# ----------------------------------------------------------------------------- Gemma 3 geometry


@pytest.mark.parametrize("size", [(224, 224), (300, 152)], ids=["square", "squashed"])
def test_gemma3_mask_on_one_cell_by_hand(size):
    # 4x4 tokens over the whole image: cell (r, c) is x in [c*w/4, (c+1)*w/4), y likewise.
    _, adapter = tiny("gemma3", "gqa")
    width, height = size
    view = adapter.prepare([noise_image(height, width)], ["a red circle"]).layouts[0].view("image")
    assert view.grid == (4, 4)
    assert view.box == (0.0, 0.0, float(width), float(height))
    mask = np.zeros((height, width), dtype=bool)
    mask[2 * height // 4 : 3 * height // 4, 1 * width // 4 : 2 * width // 4] = True
    expected = np.zeros((4, 4))
    expected[2, 1] = 1.0
    np.testing.assert_allclose(view.coverage(mask), expected, atol=1e-9)


@pytest.mark.parametrize("size", [(224, 224), (300, 152)], ids=["square", "squashed"])
@pytest.mark.parametrize("cell", [(0, 3), (2, 1)])
def test_gemma3_painted_cell_lands_on_its_pooled_patch(size, cell):
    _, adapter = tiny("gemma3", "gqa")
    width, height = size
    view = adapter.prepare([noise_image(height, width)], ["a red circle"]).layouts[0].view("image")
    image = painted(width, height, cell_rect(view.box, view.grid, *cell, inset=4))
    pixels = adapter.prepare([image], ["a red circle"]).inputs["pixel_values"][0]
    brightness = patch_brightness(pixels, view.grid)  # 56 px / 4 = the 2x2-pooled 7 px patches
    assert np.unravel_index(brightness.argmax(), brightness.shape) == cell
    others = np.delete(brightness.ravel(), np.ravel_multi_index(cell, view.grid))
    assert brightness[cell] - others.max() > 1.0, brightness


def test_gemma3_refuses_pan_and_scan():
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    _, adapter = tiny("gemma3", "gqa")
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 56, "width": 56}, do_pan_and_scan=True),
        tokenizer=adapter.tokenizer,
        chat_template=adapter.processor.chat_template,
        image_seq_length=16,
    )
    with pytest.raises(AdapterError, match="do_pan_and_scan"):
        Gemma3Adapter(adapter.config, processor)


# ----------------------------------------------------------------------------- Gemma 3 masks


def eager_attentions(model, inputs):
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)


def test_gemma3_sliding_window_cuts_visual_keys_of_description_rows():
    """In sliding layers the description rows must not see the first visual tokens; in full
    layers they do. A tracer that ignored the window would put mass on those columns."""
    model, adapter = tiny("gemma3", "gqa")
    batch = adapter.prepare([noise_image(224, 224, seed=i) for i in range(3)], DESCRIPTIONS)
    attentions = eager_attentions(model, batch.inputs)
    window = adapter.text_config.sliding_window
    layer_types = adapter.text_config.layer_types
    assert {"sliding_attention", "full_attention"} <= set(layer_types)
    cube = AttentionTracer(model, adapter).trace(batch)  # (B, L, H, V)
    for i, layout in enumerate(batch.layouts):
        visual = layout.view("image").positions
        cut = visual[visual <= layout.query_positions.min() - window]  # outside every row's window
        kept = visual[visual > layout.query_positions.max() - window]  # inside every row's window
        assert len(cut) and len(kept), "the tiny config no longer makes the window bite"
        columns = np.isin(visual, cut)
        for layer, kind in enumerate(layer_types):
            rows = attentions[layer][i][:, layout.query_positions]  # (H, Q, S)
            assert (rows[:, :, kept] > 0).all()
            if kind == "sliding_attention":
                assert (rows[:, :, cut] == 0).all()
                assert (cube[i, layer][:, : len(visual)][:, columns] == 0).all()
            else:
                assert (rows[:, :, cut] > 0).all()
                assert (cube[i, layer][:, : len(visual)][:, columns] > 0).all()


def test_gemma3_image_block_is_bidirectional_and_description_causal():
    model, adapter = tiny("gemma3", "gqa")
    batch = adapter.prepare([noise_image(224, 224)], ["a small green star"])
    layout = batch.layouts[0]
    attentions = eager_attentions(model, batch.inputs)
    visual = layout.view("image").positions
    for layer in attentions:
        weights = layer[0]  # (H, S, S)
        assert (weights[:, visual[0], visual[-1]] > 0).all(), "first image token must see the last"
        for q in layout.query_positions:
            assert (weights[:, q, q + 1 :] == 0).all(), "description rows must stay causal"


def test_gemma3_tracer_under_eager_attention_too():
    """The tracer also reads the additive float mask eager attention receives."""
    model, adapter = tiny("gemma3", "mha")
    batch = adapter.prepare([noise_image(224, 224, seed=i) for i in range(3)], DESCRIPTIONS)
    attentions = eager_attentions(model, batch.inputs)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        cube = AttentionTracer(model, adapter).trace(batch)
    finally:
        model.set_attn_implementation(previous)
    for i, layout in enumerate(batch.layouts):
        visual = layout.view("image").positions
        ref = np.stack([a[i][:, layout.query_positions][:, :, visual].mean(1).numpy() for a in attentions])
        np.testing.assert_allclose(cube[i], ref, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- both families


def language_inputs(model, inputs) -> torch.Tensor:
    """(B, S, D) embeddings the decoder receives: text embeddings with image features scattered in."""
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"]


@pytest.mark.parametrize(
    "family, local_vision",
    # Vision towers without mixing layers: LLaVA reads hidden_states[-2] = the patch
    # embeddings of a 1-layer CLIP; a 0-layer SigLIP is its patch embeddings.
    [("llava", {"vision_layers": 1}), ("gemma3", {"vision_layers": 0})],
)
@pytest.mark.parametrize("cell", [(0, 3), (2, 1)])
def test_painted_cell_reaches_the_token_the_adapter_names(family, local_vision, cell):
    """End to end through the model: with a vision tower that does not mix patches, painting
    cell (r, c) changes the decoder input at exactly ``positions[r * cols + c]``."""
    cls = LlavaAdapter if family == "llava" else Gemma3Adapter
    torch.manual_seed(0)
    model, processor = build_tiny(family, words=WORDS, **local_vision)
    adapter = cls(model.config, processor)
    width, height = 300, 200
    view = adapter.prepare([noise_image(height, width)], ["a red circle"]).layouts[0].view("image")
    black = adapter.prepare([painted(width, height, (0, 0, 0, 0))], ["a red circle"])
    rect = cell_rect(view.box, view.grid, *cell, inset=4)
    spot = adapter.prepare([painted(width, height, rect)], ["a red circle"])
    change = (language_inputs(model, spot.inputs) - language_inputs(model, black.inputs))[0].norm(dim=-1)
    changed = np.flatnonzero(change.numpy() > 1e-4)
    assert changed.tolist() == [view.positions[cell[0] * view.grid[1] + cell[1]]]


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_description_positions_decode_to_the_description(family):
    _, adapter = tiny(family, "gqa")
    sizes = [(100, 140), (224, 224), (84, 300)]
    batch = adapter.prepare([noise_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)], DESCRIPTIONS)
    ids = batch.inputs["input_ids"]
    for i, (layout, description) in enumerate(zip(batch.layouts, DESCRIPTIONS)):
        assert adapter.tokenizer.decode(ids[i, layout.query_positions]) == description
        assert (ids[i, layout.view("image").positions] == adapter.image_token_id).all()
        assert layout.query_positions.min() > layout.view("image").positions.max()


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_save_reload_offline_picks_the_adapter(family, tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cls = LlavaAdapter if family == "llava" else Gemma3Adapter
    torch.manual_seed(0)
    model, processor = build_tiny(family, tmp_path, words=WORDS)
    config = AutoConfig.from_pretrained(tmp_path)
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    adapter = adapter_for(config, reloaded_processor)
    assert type(adapter) is cls
    images = [noise_image(100, 140), noise_image(224, 224, seed=1)]
    original = cls(model.config, processor).prepare(images, DESCRIPTIONS[:2])
    batch = adapter.prepare(images, DESCRIPTIONS[:2])
    assert batch.inputs.keys() == original.inputs.keys()
    for key in batch.inputs:
        torch.testing.assert_close(batch.inputs[key], original.inputs[key])
    for a, b in zip(batch.layouts, original.layouts):
        np.testing.assert_array_equal(a.query_positions, b.query_positions)
        for x, y in zip(a.views, b.views, strict=True):
            np.testing.assert_array_equal(x.positions, y.positions)
            assert (x.grid, x.box) == (y.grid, y.box)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch.inputs).logits, model(**batch.inputs).logits)


def test_adapter_for_rejects_the_other_family():
    _, llava = tiny("llava", "gqa")
    _, gemma = tiny("gemma3", "gqa")
    assert type(adapter_for(llava.config, llava.processor)) is LlavaAdapter
    assert type(adapter_for(gemma.config, gemma.processor)) is Gemma3Adapter
    assert not LlavaAdapter.matches(gemma.config) and not Gemma3Adapter.matches(llava.config)
