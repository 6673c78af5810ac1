"""Tiny random-weight models of every supported family, for tests: mechhi's and yours.

A tiny model is the family's real transformers class (``Qwen2VLForConditionalGeneration``,
``PaliGemmaForConditionalGeneration``, ...) built from a config a few layers deep and a
few dozen units wide, with random weights, and the family's real processor class around
an offline word-level tokenizer (`mechhi.models._tokenizer`): nothing is downloaded. The
adapter, the tracer and every command treat it exactly as a checkpoint of that family,
in seconds on a CPU. That is how mechhi's own tests cover each family, and how tests of
code built on mechhi can run without a checkpoint::

    from mechhi.models import adapter_for
    from mechhi.models.tiny import build_tiny

    model, processor = build_tiny("qwen2-vl", words=["red", "circle"], layers=3)
    adapter = adapter_for(model.config, processor)
    build_tiny("llava", "tiny-llava")  # saved: mechhi trace --model tiny-llava ...

`build_tiny` takes a family name (`FAMILY_NAMES`, the adapters' ``family``); the
per-family builders (`tiny_qwen2_vl`, `tiny_paligemma`, `tiny_idefics3`, `tiny_llava`,
`tiny_gemma3`) document their options. `CASES` names, per family, the option sets the
test suite runs (grouped-query and multi-head attention, Qwen2.5-VL, PaliGemma 2, ...).
The ``words`` option adds words to the tokenizer's vocabulary (a few prompt words are
always there); a word it lacks is ``<unk>``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mechhi.models._common import AdapterError
from mechhi.models._tokenizer import word_level_tokenizer
from mechhi.models.idefics3 import GLOBAL_TOKEN, MAX_TILES_PER_SIDE, tile_marker
from mechhi.models.paligemma import SEPARATOR

VISION_WIDTH = 32  # the tiny SigLIP / CLIP / Idefics3 vision towers' width (Qwen2-VL's is an option)


# ----------------------------------------------------------------------------- shared parts


def _decoder(
    tokenizer: Any,
    *,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab_size: int | None,
    bos: str,
    eos: str,
    **fields: Any,
) -> dict[str, Any]:
    """The text config's fields every family sets alike, plus the family's own ``fields``.

    The vocabulary is the tokenizer's, or ``vocab_size`` where that is larger (unused rows);
    ``bos`` and ``eos`` are token strings, the pad token is the tokenizer's ``<pad>``.
    """
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        vocab_size=max(len(tokenizer), vocab_size or 0),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        pad_token_id=ids("<pad>"),
        bos_token_id=ids(bos),
        eos_token_id=ids(eos),
        **fields,
    )


def _vision(layers: int, image_size: int, patch_size: int, **fields: Any) -> dict[str, Any]:
    """A ``VISION_WIDTH``-wide, two-head ViT config (SigLIP, CLIP, Idefics3's tower)."""
    return dict(
        hidden_size=VISION_WIDTH,
        intermediate_size=2 * VISION_WIDTH,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        **fields,
    )


def _finish(model: Any, processor: Any, directory: Path | None) -> tuple[Any, Any]:
    """(model, processor), both saved to ``directory`` first unless it is None."""
    if directory is not None:
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
    return model, processor


# ----------------------------------------------------------------------------- Qwen2-VL

QWEN2_VL_SPECIAL_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

QWEN2_VL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen2_vl(
    directory: Path | None = None,
    *,
    words: list[str] | None = None,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    vision_depth: int = 1,
    vision_width: int = 32,
    max_pixels: int = 28 * 28 * 64,
    init_std: float = 0.02,
    qwen25: bool = False,
    intermediate: int | None = None,
    vocab_size: int | None = None,
) -> tuple[Any, Any]:
    """A tiny random Qwen2-VL (or Qwen2.5-VL) and its processor.

    ``intermediate`` (default 4 x hidden) and ``vocab_size`` (default: the word-level
    tokenizer's size; larger leaves unused rows) let a benchmark give the text model
    a real checkpoint's dimensions.
    """
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = word_level_tokenizer(
        words or [],
        QWEN2_VL_SPECIAL_TOKENS,
        eos_token="<|im_end|>",
        extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    size = {"shortest_edge": 28 * 28 * 4, "longest_edge": max_pixels}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids
    quarter = head_dim // 4  # mrope sections (t, h, w) must sum to head_dim / 2
    text = _decoder(
        tokenizer,
        hidden=heads * head_dim,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate or 4 * heads * head_dim,
        vocab_size=vocab_size,
        bos="<|endoftext|>",
        eos="<|im_end|>",
        initializer_range=init_std,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter],
        },
    )
    vision: dict[str, Any] = {
        "depth": vision_depth,
        "hidden_size": vision_width,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
        "initializer_range": init_std,
    }
    special = {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }
    if qwen25:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        vision.update(
            intermediate_size=2 * vision_width,
            out_hidden_size=heads * head_dim,
            fullatt_block_indexes=[0],
            window_size=56,
        )
    else:
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model

        vision.update(embed_dim=vision_width, mlp_ratio=2, hidden_size=heads * head_dim)
    config = Config(text_config=text, vision_config=vision, **special)
    return _finish(Model(config).eval(), processor, directory)


# ----------------------------------------------------------------------------- PaliGemma

PALIGEMMA_SPECIAL_TOKENS = ["<bos>", "<eos>", "<image>"]


def tiny_paligemma(
    directory: Path | None = None,
    *,
    words: list[str] | None = None,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 1,
    head_dim: int = 16,
    image_size: int = 56,
    patch_size: int = 14,
    vision_layers: int = 1,
    gemma2: bool = False,
    attn_logit_softcapping: float = 5.0,
    query_pre_attn_scalar: int = 24,
    sliding_window: int = 12,
    init_std: float = 0.02,
    attn_implementation: str | None = None,
    hidden: int | None = None,
    intermediate: int | None = None,
    vocab_size: int | None = None,
) -> tuple[Any, Any]:
    """A tiny random PaliGemma (``gemma2=False``) or PaliGemma 2 and its processor.

    The Gemma 2 settings are chosen to bite on random weights: ``query_pre_attn_scalar``
    differs from ``head_dim`` so the scaling is not 1/sqrt(head_dim), a 12-token window
    on the sliding layers hides part of the 16 image tokens from the description rows,
    and a softcap of 5 clips the logits once ``init_std`` (the weights' init std) is
    large enough to make logits of that size: at HF's 0.02 they stay near 0.02 and
    the tanh is the identity to 1e-7.

    ``hidden`` (default heads x head_dim; Gemma 2 2B has 2304 for 8 x 256),
    ``intermediate`` (default 2 x hidden) and ``vocab_size`` (default: the tokenizer's
    size; larger leaves unused rows) let a benchmark give the text model a real
    checkpoint's dimensions.
    """
    from transformers import (
        AddedToken,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    tokenizer = word_level_tokenizer(
        words or [],
        PALIGEMMA_SPECIAL_TOKENS,
        bos_token="<bos>",
        eos_token="<eos>",
        extra={"image_token": "<image>"},
    )
    tokenizer.add_tokens([AddedToken(SEPARATOR, normalized=False)])
    grid = image_size // patch_size
    image_processor = SiglipImageProcessor(
        size={"height": image_size, "width": image_size},
        image_seq_length=grid * grid,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    # The processor adds the 1024 <loc> and 128 <seg> tokens: size the vocabulary after it.
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    hidden = hidden or heads * head_dim
    text = _decoder(
        tokenizer,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate or 2 * hidden,
        vocab_size=vocab_size,
        bos="<bos>",
        eos="<eos>",
        model_type="gemma2" if gemma2 else "gemma",
        head_dim=head_dim,
        initializer_range=init_std,
    )
    if gemma2:
        text.update(
            attn_logit_softcapping=attn_logit_softcapping,
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=query_pre_attn_scalar,
            sliding_window=sliding_window,
        )
    vision = _vision(
        vision_layers, image_size, patch_size, model_type="siglip_vision_model", vision_use_head=False
    )
    config = PaliGemmaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.image_token_id,
        projection_dim=hidden,
        hidden_size=hidden,
        vocab_size=text["vocab_size"],
    )
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return _finish(PaliGemmaForConditionalGeneration(config).eval(), processor, directory)


# ----------------------------------------------------------------------------- Idefics3

IDEFICS3_FAKE_TOKEN = "<fake_token_around_image>"
IDEFICS3_IMAGE_TOKEN = "<image>"
IDEFICS3_END_OF_UTTERANCE = "<end_of_utterance>"

# SmolVLM's chat template (its image-only form): "User:<image>...<end_of_utterance>\nAssistant: ..."
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def tiny_idefics3(
    directory: Path | None = None,
    *,
    words: list[str] | None = None,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    vision_depth: int = 1,
    patch_size: int = 14,
    tile_patches: int = 6,
    scale_factor: int = 2,
    tiles_per_side: int = 2,
    split: bool = True,
    smolvlm: bool = False,
    intermediate: int | None = None,
    vocab_size: int | None = None,
) -> tuple[Any, Any]:
    """Tiny random Idefics3 (or SmolVLM) model with a processor that tiles images.

    A tile is ``tile_patches`` x ``tile_patches`` patches (84 px by default); the
    longest edge is resized to ``tiles_per_side`` tiles, so a square image becomes
    2 x 2 tiles and a wide one 1 x 2. ``intermediate`` (default 4 x hidden) and
    ``vocab_size`` (default: the tokenizer's size; larger leaves unused rows) let a
    benchmark give the text model a real checkpoint's dimensions.
    """
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    if tile_patches % scale_factor:
        raise AdapterError(f"tile_patches={tile_patches} is not a multiple of scale_factor={scale_factor}")
    tile = tile_patches * patch_size
    side = max(MAX_TILES_PER_SIDE, tiles_per_side)
    markers = [tile_marker(r, c) for r in range(side) for c in range(side)]
    fake, image, end = IDEFICS3_FAKE_TOKEN, IDEFICS3_IMAGE_TOKEN, IDEFICS3_END_OF_UTTERANCE
    tokenizer = word_level_tokenizer(
        [*(words or []), "User", "Assistant", "What"],
        ["<|im_start|>", end, fake, image, GLOBAL_TOKEN, *markers],
        eos_token=end,
        bos_token="<|im_start|>",
        extra={
            "image_token": image,
            "fake_image_token": fake,
            "global_image_token": GLOBAL_TOKEN,
            "end_of_utterance_token": end,
        },
    )
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": tile * tiles_per_side},
        max_image_size={"longest_edge": tile},
        do_image_splitting=split,
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(tile_patches // scale_factor) ** 2,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    text = _decoder(
        tokenizer,
        hidden=heads * head_dim,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate or 4 * heads * head_dim,
        vocab_size=vocab_size,
        bos="<|im_start|>",
        eos=end,
        model_type="llama",
        head_dim=head_dim,
    )
    vision = _vision(vision_depth, tile, patch_size)
    if smolvlm:
        from transformers import SmolVLMConfig as Config
        from transformers import SmolVLMForConditionalGeneration as Model
    else:
        from transformers import Idefics3Config as Config
        from transformers import Idefics3ForConditionalGeneration as Model
    config = Config(
        text_config=text,
        vision_config=vision,
        scale_factor=scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids(image),
    )
    return _finish(Model(config).eval(), processor, directory)


# ----------------------------------------------------------------------------- LLaVA

LLAVA_SPECIAL_TOKENS = ["<s>", "</s>", "<image>"]
LLAVA_ROLE_WORDS = ["USER", "ASSISTANT", "What"]  # BASE_WORDS has only lower-case "what"

# LLaVA-1.5's conversation format: "USER: <image>\n{question} ASSISTANT: {answer}</s>".
LLAVA_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% if m['role'] == 'assistant' %}</s>{% else %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tiny_llava(
    directory: Path | None = None,
    *,
    words: list[str] | None = None,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    patch: int = 14,
    crop: int = 56,
    shortest_edge: int = 70,
    vision_layers: int = 2,
    intermediate: int | None = None,
    vocab_size: int | None = None,
) -> tuple[Any, Any]:
    """Tiny LLaVA: ``vision_layers``-layer CLIP on a ``crop`` px centre crop, tiny Llama decoder.

    ``intermediate`` (default 4 x hidden) and ``vocab_size`` (default: the tokenizer's
    size; larger leaves unused rows) let a benchmark give the decoder a real model's
    dimensions.

    ``shortest_edge`` > ``crop`` makes the crop cut into the short side too, so the
    crop box is a strict sub-rectangle of every image.
    """
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    if crop % patch:
        raise AdapterError(f"llava: crop {crop} is not a multiple of patch {patch}")
    tokenizer = word_level_tokenizer(
        [*LLAVA_ROLE_WORDS, *(words or [])],
        LLAVA_SPECIAL_TOKENS,
        eos_token="</s>",
        bos_token="<s>",
        extra={"image_token": "<image>"},
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": shortest_edge}, crop_size={"height": crop, "width": crop}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    # initializer_range 0.2 (Llama's 0.02 gives near-uniform attention in a 64-wide
    # model, which would let a wrong token order pass the equivalence tests).
    text = _decoder(
        tokenizer,
        hidden=heads * head_dim,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate or 4 * heads * head_dim,
        vocab_size=vocab_size,
        bos="<s>",
        eos="</s>",
        model_type="llama",
        head_dim=head_dim,
        initializer_range=0.2,
    )
    vision = _vision(vision_layers, crop, patch, model_type="clip_vision_model", projection_dim=VISION_WIDTH)
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(crop // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return _finish(LlavaForConditionalGeneration(config).eval(), processor, directory)


# ----------------------------------------------------------------------------- Gemma 3

GEMMA3_BOI, GEMMA3_EOI, GEMMA3_IMAGE = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
GEMMA3_SPECIAL_TOKENS = [
    "<bos>",
    "<eos>",
    "<start_of_turn>",
    "<end_of_turn>",
    GEMMA3_BOI,
    GEMMA3_EOI,
    GEMMA3_IMAGE,
]
GEMMA3_ROLE_WORDS = ["model", "What"]  # BASE_WORDS has "user" but not Gemma's "model" nor "What"

# Gemma's turn format; the role "assistant" is written "model", the image is the boi token.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def tiny_gemma3(
    directory: Path | None = None,
    *,
    words: list[str] | None = None,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    image_size: int = 56,
    patch: int = 7,
    tokens_per_side: int = 4,
    sliding_window: int = 24,
    layer_types: tuple[str, ...] = ("sliding_attention", "full_attention", "sliding_attention"),
    vision_layers: int = 1,
) -> tuple[Any, Any]:
    """Tiny Gemma 3: SigLIP on ``image_size`` px, 8x8 patches pooled to 4x4 tokens.

    ``sliding_window`` is small enough that, in a one-sentence test prompt, the
    description rows of sliding layers cannot see the first visual tokens, and
    ``query_pre_attn_scalar`` differs from ``head_dim`` so a tracer that assumed
    1/sqrt(head_dim) scaling would fail. One decoder layer per ``layer_types`` entry.
    """
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
    )

    boi, eoi, image = GEMMA3_BOI, GEMMA3_EOI, GEMMA3_IMAGE
    tokenizer = word_level_tokenizer(
        [*GEMMA3_ROLE_WORDS, *(words or [])],
        GEMMA3_SPECIAL_TOKENS,
        eos_token="<eos>",
        bos_token="<bos>",
        extra={"image_token": image, "boi_token": boi, "eoi_token": eoi},
    )
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=tokens_per_side**2,
    )
    ids = tokenizer.convert_tokens_to_ids
    text = _decoder(
        tokenizer,
        hidden=heads * head_dim,
        layers=len(layer_types),
        heads=heads,
        kv_heads=kv_heads,
        intermediate=4 * heads * head_dim,
        vocab_size=None,
        bos="<bos>",
        eos="<eos>",
        head_dim=head_dim,
        query_pre_attn_scalar=3 * head_dim // 2,
        sliding_window=sliding_window,
        layer_types=list(layer_types),
        max_position_embeddings=512,
    )
    vision = _vision(
        vision_layers, image_size, patch, model_type="siglip_vision_model", vision_use_head=False
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=tokens_per_side**2,
        boi_token_index=ids(boi),
        eoi_token_index=ids(eoi),
        image_token_index=ids(image),
    )
    model = Gemma3ForConditionalGeneration(config).eval()
    # HF initialises the projector to zeros (real weights overwrite it): every image token
    # would then carry the same zero key, and tests could not tell visual tokens apart.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=VISION_WIDTH**-0.5)
    return _finish(model, processor, directory)


# ----------------------------------------------------------------------------- by family name

BUILDERS: dict[str, Callable[..., tuple[Any, Any]]] = {
    "qwen2-vl": tiny_qwen2_vl,
    "paligemma": tiny_paligemma,
    "idefics3": tiny_idefics3,
    "llava": tiny_llava,
    "gemma3": tiny_gemma3,
}
FAMILY_NAMES: tuple[str, ...] = tuple(BUILDERS)

# Named option sets per family: the variants the test suite runs every family's tests on.
CASES: dict[str, dict[str, dict[str, Any]]] = {
    "qwen2-vl": {"gqa": {}, "mha": {"kv_heads": 4}, "qwen2.5": {"qwen25": True}},
    "paligemma": {
        "gemma": {"kv_heads": 1},  # PaliGemma 1 3B is multi-query (8 heads, 1 kv head)
        "gemma-mha": {"kv_heads": 4},
        # Gemma 2 has no SDPA path (softcap): by default its decoder falls back to eager
        # while the top config still says "sdpa", and set_attn_implementation("sdpa")
        # then raises. Asking for eager up front, as HF's own error message advises,
        # keeps the config consistent.
        "gemma2": {"gemma2": True, "kv_heads": 2, "init_std": 0.1, "attn_implementation": "eager"},
    },
    "idefics3": {
        "tiles": {},  # GQA, 2x2 / 1x2 tiles of 3x3 tokens
        "mha": {"kv_heads": 4, "scale_factor": 3},  # 2x2 tokens per tile
        "unsplit": {"split": False},  # only the global image
        "smolvlm": {"smolvlm": True},  # SmolVLM model class, same layout
    },
    "llava": {"gqa": {}, "mha": {"kv_heads": 4}},
    "gemma3": {
        "gqa": {},
        "mha": {"kv_heads": 4, "layer_types": ("full_attention", "sliding_attention")},
    },
}


def build_tiny(family: str, directory: Path | None = None, **options: Any) -> tuple[Any, Any]:
    """A tiny random ``family`` model and its processor, saved to ``directory`` unless None.

    ``options`` are the family builder's keyword arguments (`tiny_qwen2_vl`, ...); an
    unknown family fails with a one-line error listing the families.
    """
    builder = BUILDERS.get(family)
    if builder is None:
        raise AdapterError(f"no tiny model for family {family!r}; families: {', '.join(FAMILY_NAMES)}")
    return builder(directory, **options)
