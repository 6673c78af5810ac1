"""Qwen2-VL / Qwen2.5-VL token layout: grid mapping, token order, answer positions, reload."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mechhi.models import adapter_for
from mechhi.models.qwen2_vl import Qwen2VLAdapter
from mechhi.models.tiny import tiny_qwen2_vl
from tests.conftest import WORDS, tiny

HEIGHT, WIDTH = 224, 168  # multiples of 28 inside the tiny processor's pixel budget: no resize
ROWS, COLS = 8, 6


@pytest.fixture(scope="module", params=["gqa", "qwen2.5"])
def qwen(request):
    return tiny("qwen2-vl", request.param)


def test_one_token_mask_lands_on_its_cell(qwen):
    _, adapter = qwen
    image = Image.new("RGB", (WIDTH, HEIGHT), "gray")
    layout = adapter.prepare([image], ["a red circle"]).layouts[0]
    (view,) = layout.views
    assert view.grid == (ROWS, COLS)
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[2 * 28 : 3 * 28, 4 * 28 : 5 * 28] = True  # exactly token (2, 4)
    expected = np.zeros((ROWS, COLS))
    expected[2, 4] = 1.0
    np.testing.assert_allclose(view.coverage(mask), expected, atol=1e-12)


def test_token_order_matches_pixel_values(qwen):
    """Paint one 28 px block; the 4 merged patches of token r*cols+c must be the red ones."""
    _, adapter = qwen
    for r, c in [(0, 0), (2, 4), (7, 5), (5, 1)]:
        pixels = np.full((HEIGHT, WIDTH, 3), 128, np.uint8)
        pixels[r * 28 : (r + 1) * 28, c * 28 : (c + 1) * 28] = (255, 0, 0)
        batch = adapter.prepare([Image.fromarray(pixels)], ["a red circle"])
        patches = batch.inputs["pixel_values"].numpy()  # (n_patches, C * T * 14 * 14)
        red = patches[:, : patches.shape[1] // 3].mean(1) - patches[:, patches.shape[1] // 3 :].mean(1)
        token = int(np.argmax(red.reshape(-1, 4).mean(1)))  # 2x2 merged patches per token
        assert token == r * COLS + c
        assert (red.reshape(-1, 4)[token] > 1).all() and (np.delete(red.reshape(-1, 4), token, 0) < 0.5).all()
        assert len(batch.layouts[0].views[0].positions) == ROWS * COLS


def test_description_positions_decode_to_the_description(qwen):
    _, adapter = qwen
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for h, w in [(56, 84), (224, 224), (84, 56)]
    ]
    descriptions = ["a red circle", "a small green star", "blue square"]
    batch = adapter.prepare(images, descriptions)
    for i, (layout, text) in enumerate(zip(batch.layouts, descriptions)):
        ids = batch.inputs["input_ids"][i, layout.query_positions]
        assert adapter.tokenizer.convert_ids_to_tokens(ids.tolist()) == text.split()
        tokens = batch.inputs["input_ids"][i, layout.views[0].positions]
        assert (tokens == adapter.image_token_id).all()


def test_vqa_answer_is_the_letter_after_the_options(qwen):
    _, adapter = qwen
    image = Image.new("RGB", (56, 56), "white")
    batch = adapter.prepare(
        [image],
        ["B"],
        template="vqa",
        fields=[{"options": "A) a red circle B) a blue star C) a red star D) B"}],
    )
    (position,) = batch.layouts[0].query_positions
    ids = batch.inputs["input_ids"][0].tolist()
    assert adapter.tokenizer.convert_ids_to_tokens(ids[position]) == "B"
    assert position > max(i for i, t in enumerate(ids) if t == adapter.tokenizer.convert_tokens_to_ids("D"))


def test_save_reload_offline_and_adapter_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from mechhi.models.loading import load

    torch.manual_seed(0)
    model, processor = tiny_qwen2_vl(tmp_path, words=WORDS)
    reloaded, adapter = load(tmp_path, device="cpu", dtype="float32")
    assert isinstance(adapter, Qwen2VLAdapter)
    assert isinstance(adapter_for(model.config, processor), Qwen2VLAdapter)
    batch = adapter.prepare([Image.new("RGB", (84, 84), "red")], ["a red circle"])
    with torch.no_grad():
        np.testing.assert_allclose(
            reloaded(**batch.inputs).logits, model.eval()(**batch.inputs).logits, atol=1e-6
        )
