"""PaliGemma adapter: token grid, description positions, prefix-LM mask, save/reload.

References are independent of the adapter: painted pixels found in ``pixel_values``,
the SigLIP patch convolution applied by hand, the decoded tokens, and the model's own
eager attention matrices.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mechhi.models import AdapterError, adapter_for
from mechhi.models.paligemma import PaliGemmaAdapter
from mechhi.models.tiny import CASES, tiny_paligemma
from mechhi.trace import AttentionTracer
from tests.conftest import WORDS, noise_image, tiny

DESCRIPTIONS = ["a red circle", "blue square", "a small green star"]
OPTIONS = "A) red circle B) blue square C) small green star D) yellow triangle"
PATCH = 14
# A 168 x 112 original onto the 4 x 4 grid of a 56 px model: each token cell is 42 x 28 px.
WIDTH, HEIGHT, CELL = 168, 112, (1, 2)


def cell_slices(cell: tuple[int, int], rows: int, cols: int) -> tuple[slice, slice]:
    """Original-image (y, x) slices of token cell ``cell`` under a full-image square resize."""
    r, c = cell
    ys = slice(r * HEIGHT // rows, (r + 1) * HEIGHT // rows)
    return ys, slice(c * WIDTH // cols, (c + 1) * WIDTH // cols)


@pytest.fixture(params=list(CASES["paligemma"]))
def case(request):
    return tiny("paligemma", request.param)


# ----------------------------------------------------------------------------- token grid


def test_mask_on_one_patch_covers_exactly_that_cell():
    model, adapter = tiny("paligemma", "gemma")
    layout = adapter.prepare([noise_image(HEIGHT, WIDTH)], ["red circle"]).layouts[0]
    view = layout.view("image")
    assert view.grid == (4, 4)
    np.testing.assert_array_equal(view.positions, np.arange(16))  # image tokens come first
    mask = np.zeros((HEIGHT, WIDTH))
    mask[cell_slices(CELL, 4, 4)] = 1
    expected = np.zeros((4, 4))
    expected[CELL] = 1.0
    np.testing.assert_allclose(view.coverage(mask), expected, atol=1e-12)


def test_processor_puts_the_painted_patch_at_its_token():
    """Paint cell (r, c) of the original; the processor must move it to patch (r, c) of a
    row-major grid, and the SigLIP embedding must read it as token r * cols + c."""
    model, adapter = tiny("paligemma", "gemma")
    pixels = np.full((HEIGHT, WIDTH, 3), 128, dtype=np.uint8)
    pixels[cell_slices(CELL, 4, 4)] = (255, 0, 0)
    batch = adapter.prepare([Image.fromarray(pixels)], ["red circle"])
    values = batch.inputs["pixel_values"][0]  # (3, 56, 56), normalised to [-1, 1]
    redness = (values[0] - values[1]).numpy()
    r, c = CELL
    inside = np.zeros(redness.shape, dtype=bool)
    inside[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] = True
    # Bicubic antialiased downscaling (3x across, 2x down) spreads an edge over ~2 px of
    # the 56 px image: the whole patch is red, a 2 px ring is faint, beyond it is grey.
    ring = np.zeros_like(inside)
    ring[r * PATCH - 2 : (r + 1) * PATCH + 2, c * PATCH - 2 : (c + 1) * PATCH + 2] = True
    ring &= ~inside
    assert np.all(redness[inside] > 1.5), "the painted cell is not red all over its patch"
    assert np.all(np.abs(redness[ring]) < 0.2), "red leaked more than 2 px out of the patch"
    assert np.all(np.abs(redness[~inside & ~ring]) < 1e-6), "red appears away from the patch"
    per_patch = redness.reshape(4, PATCH, 4, PATCH).mean(axis=(1, 3))
    token = int(np.argmax(per_patch))
    assert token == r * 4 + c
    # The model side: token t of the vision embedding is the patch convolution of
    # pixel block (t // cols, t % cols), computed here by hand.
    embeddings = model.get_submodule(adapter.vision_tower).embeddings
    captured = {}
    hook = embeddings.register_forward_hook(lambda m, a, out: captured.setdefault("out", out))
    with torch.no_grad():
        model(**batch.inputs)
    hook.remove()
    conv = embeddings.patch_embedding
    for t in (0, token, 15):
        block = values[:, (t // 4) * PATCH : (t // 4 + 1) * PATCH, (t % 4) * PATCH : (t % 4 + 1) * PATCH]
        by_hand = (conv.weight * block).sum(dim=(1, 2, 3)) + conv.bias  # (D,)
        by_hand = by_hand + embeddings.position_embedding.weight[t]
        torch.testing.assert_close(captured["out"][0, t], by_hand, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- prompts


def test_caption_positions_decode_to_the_descriptions(case):
    model, adapter = case
    images = [noise_image(224, 224, seed=i) for i in range(3)]
    batch = adapter.prepare(images, DESCRIPTIONS)
    ids, valid = batch.inputs["input_ids"], batch.inputs["attention_mask"].bool()
    tok = adapter.tokenizer
    assert not valid.all(), "descriptions of different lengths must produce padding"
    for i, (layout, description) in enumerate(zip(batch.layouts, DESCRIPTIONS)):
        query = layout.query_positions
        assert tok.decode(ids[i, query]) == description
        n = int(valid[i].sum())
        assert valid[i, :n].all(), "padding must be on the right"
        assert query[-1] == n - 2 and ids[i, n - 1] == tok.eos_token_id  # description, then eos
        assert tok.convert_ids_to_tokens(int(ids[i, query[0] - 1])) == "\n"  # the prefix separator
        assert tok.decode(ids[i, 16 : query[0] - 1]) == "<bos> describe en"


def test_vqa_positions_are_the_answer_letter_not_the_option():
    model, adapter = tiny("paligemma", "gemma")
    images = [noise_image(224, 224, seed=i) for i in range(3)]
    letters = ["A", "C", "B"]
    batch = adapter.prepare(images, letters, template="vqa", fields=[{"options": OPTIONS}] * 3)
    ids, types = batch.inputs["input_ids"], batch.inputs["token_type_ids"]
    tok = adapter.tokenizer
    for i, (layout, letter) in enumerate(zip(batch.layouts, letters)):
        (position,) = layout.query_positions
        assert tok.decode(ids[i, [position]]) == letter
        assert types[i, position] == 1, "the answer must sit in the suffix"
        prompt = tok.decode(ids[i, 16:position])
        assert prompt == f"<bos> answer en \n {OPTIONS.replace(')', ' )')} \n"


def test_token_type_ids_mark_the_suffix(case):
    model, adapter = case
    batch = adapter.prepare([noise_image(224, 224, seed=i) for i in range(3)], DESCRIPTIONS)
    types, valid = batch.inputs["token_type_ids"], batch.inputs["attention_mask"].bool()
    for i, layout in enumerate(batch.layouts):
        n = int(valid[i].sum())
        expected = torch.zeros_like(types[i])
        expected[layout.query_positions[0] : n] = 1  # description + eos
        torch.testing.assert_close(types[i], expected)


def test_prefix_is_bidirectional_and_suffix_causal(case):
    """Read from the model's eager attention: image rows see later prompt tokens, no
    prefix row sees the suffix, and no description row sees a later token."""
    model, adapter = case
    batch = adapter.prepare([noise_image(224, 224, seed=i) for i in range(3)], DESCRIPTIONS)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(**batch.inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(previous)
    valid = batch.inputs["attention_mask"].bool()
    for i, layout in enumerate(batch.layouts):
        n, start = int(valid[i].sum()), int(layout.query_positions[0])
        last_image, separator = int(layout.view("image").positions[-1]), start - 1  # "\n" ends the prefix
        for a in attentions:  # (B, H, T, T)
            probs = a[i, :, :n, :n]
            assert torch.all(probs[:, last_image, separator] > 0), "the last image token must see the prompt"
            assert torch.all(probs[:, :start, start:] == 0), "the prefix must not see the suffix"
            later = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)[start:]
            assert torch.all(probs[:, start:][:, later] == 0), "a description row sees a later token"
            assert torch.all(probs[:, start:, start - 1] > 0), "a description row misses the prefix"


def test_gemma2_softcap_and_scaling_change_the_attention():
    """The gemma2 tiny case must exercise softcap and query_pre_attn_scalar, or the
    shared tracer-equals-eager test would pass without handling them."""
    model, adapter = tiny("paligemma", "gemma2")
    batch = adapter.prepare([noise_image(224, 224)], ["a small green star"])
    attention_modules = [layer.self_attn for layer in model.model.language_model.layers]
    head_dim = model.config.text_config.head_dim

    def eager() -> torch.Tensor:
        with torch.no_grad():
            return torch.stack(model(**batch.inputs, output_attentions=True).attentions)

    reference = eager()
    try:
        for module in attention_modules:
            module.attn_logit_softcapping = None
        uncapped = eager()
        for module in attention_modules:
            module.scaling = head_dim**-0.5
        rescaled = eager()
    finally:
        for module in attention_modules:
            module.attn_logit_softcapping = model.config.text_config.attn_logit_softcapping
            module.scaling = model.config.text_config.query_pre_attn_scalar**-0.5
    assert (reference - uncapped).abs().max() > 1e-3
    assert (uncapped - rescaled).abs().max() > 1e-3
    torch.testing.assert_close(eager(), reference)  # restored


# ----------------------------------------------------------------------------- model


def test_paths_and_lora_regex_point_at_the_decoder():
    import re

    for case_name in ("gemma", "gemma2"):
        model, adapter = tiny("paligemma", case_name)
        layers = model.get_submodule(adapter.decoder_layers)
        assert len(layers) == adapter.n_layers == 2
        expected = "Gemma2DecoderLayer" if case_name == "gemma2" else "GemmaDecoderLayer"
        assert type(layers[0]).__name__ == expected
        assert type(model.get_submodule(adapter.vision_tower)).__name__ == "SiglipVisionModel"
        pattern = re.compile(adapter.lora_target_regex([1]))
        hits = [name for name, _ in model.named_modules() if pattern.fullmatch(name)]
        assert hits == [f"model.language_model.layers.1.self_attn.{p}_proj" for p in "qkv"]


def test_save_and_reload_offline(tmp_path, monkeypatch):
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(1)
    case = CASES["paligemma"]["gemma2"]
    model, processor = tiny_paligemma(tmp_path, words=WORDS, **case)
    reloaded = PaliGemmaForConditionalGeneration.from_pretrained(tmp_path).eval()  # default attention
    reprocessor = AutoProcessor.from_pretrained(tmp_path)
    adapter = adapter_for(reloaded.config, reprocessor)
    assert isinstance(adapter, PaliGemmaAdapter)
    assert reprocessor.image_seq_length == 16 and reprocessor.image_token == "<image>"
    text = reloaded.config.text_config
    assert (text.attn_logit_softcapping, text.query_pre_attn_scalar, text.sliding_window) == (5.0, 24, 12)
    images = [noise_image(224, 224, seed=i) for i in range(3)]
    original = adapter_for(model.config, processor).prepare(images, DESCRIPTIONS)
    batch = adapter.prepare(images, DESCRIPTIONS)
    for key, value in original.inputs.items():
        torch.testing.assert_close(batch.inputs[key], value, atol=0, rtol=0)
    for a, b in zip(original.layouts, batch.layouts):
        np.testing.assert_array_equal(a.query_positions, b.query_positions)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch.inputs).logits, model(**original.inputs).logits)
    # The reloaded model runs whatever attention transformers picked (the Gemma 2
    # decoder falls back to eager); the tracer must still agree with eager attention.
    cube = AttentionTracer(reloaded, adapter).trace(batch)
    with torch.no_grad():
        attentions = model(**original.inputs, output_attentions=True).attentions
    for i, layout in enumerate(batch.layouts):
        rows = layout.query_positions
        ref = np.stack([a[i][:, rows][:, :, :16].mean(1).numpy() for a in attentions])
        np.testing.assert_allclose(cube[i], ref, atol=1e-5, rtol=0)


def test_bad_inputs_fail_with_a_message():
    model, adapter = tiny("paligemma", "gemma")
    with pytest.raises(AdapterError, match="unknown template"):
        adapter.render("chat", "red circle")
    broken = PaliGemmaAdapter(model.config, adapter.processor)
    broken.config = type(model.config).from_dict({**model.config.to_dict()})
    broken.config.vision_config.patch_size = 8
    with pytest.raises(AdapterError, match="image_seq_length=16"):
        broken.prepare([noise_image(224, 224)], ["red circle"])
