"""Gemma 3: SigLIP on a fixed square, patches average-pooled to ``mm_tokens_per_image``.

The image processor resizes every image to one square size (aspect ratio *not* kept),
SigLIP cuts it into (size / patch)^2 patches and the projector average-pools them to a
sqrt(mm_tokens_per_image)-sided grid, row-major. The processor expands the
``<start_of_image>`` placeholder in the text into ``\\n\\n<start_of_image>`` +
``<image_soft_token>`` x ``image_seq_length`` + ``<end_of_image>\\n\\n``; the soft tokens
are the visual tokens. Since the squash covers the whole image, the grid spans the
whole original image box.

Attention facts the tracer relies on (handled there, through the mask the model builds):
sliding-window layers interleaved with global ones, ``query_pre_attn_scalar`` scaling,
and bidirectional attention inside each image block (``token_type_ids``) while text,
and so the description rows, stays causal.

Pan-and-scan (extra crops of the image, each its own block) is off by default and is
refused: it would add views whose boxes this adapter does not compute.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ._common import AdapterError, VisualView, VLMAdapter
from ._tokenizer import word_level_tokenizer

BOI, EOI, IMAGE = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
SPECIAL_TOKENS = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", BOI, EOI, IMAGE]
ROLE_WORDS = ["model", "What"]  # BASE_WORDS has "user" but not Gemma's "model" nor "What"

# Gemma's turn format; the role "assistant" is written "model", the image is the boi token.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


class Gemma3Adapter(VLMAdapter):
    family = "gemma3"
    model_types = ("gemma3",)
    variable_image_size = False
    tiny_cases = {
        "gqa": {},
        "mha": {"kv_heads": 4, "layer_types": ("full_attention", "sliding_attention")},
    }

    def __init__(self, config: Any, processor: Any) -> None:
        super().__init__(config, processor)
        image_processor = getattr(processor, "image_processor", None)
        if getattr(image_processor, "do_pan_and_scan", False):
            raise AdapterError(
                "gemma3: the image processor has do_pan_and_scan on; turn it off (one view per image)"
            )

    def visual_views(self, inputs: dict, index: int, image_size: tuple[int, int]) -> list[VisualView]:
        positions = self.image_token_positions(inputs, index)
        expected = int(self.config.mm_tokens_per_image)
        if len(positions) != expected:
            raise AdapterError(
                f"gemma3: sample {index} has {len(positions)} image tokens, expected mm_tokens_per_image="
                f"{expected} (pan-and-scan crops or several images are not supported)"
            )
        side = math.isqrt(expected)
        if side * side != expected:
            raise AdapterError(f"gemma3: mm_tokens_per_image={expected} is not a square")
        width, height = image_size
        return [VisualView("image", positions, (side, side), (0.0, 0.0, float(width), float(height)))]

    @classmethod
    def build_tiny(
        cls,
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
        1/sqrt(head_dim) scaling would fail.
        """
        from transformers import (
            Gemma3Config,
            Gemma3ForConditionalGeneration,
            Gemma3ImageProcessor,
            Gemma3Processor,
        )

        tokenizer = word_level_tokenizer(
            [*ROLE_WORDS, *(words or [])], SPECIAL_TOKENS, eos_token="<eos>", bos_token="<bos>",
            extra={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI},
        )  # fmt: skip
        processor = Gemma3Processor(
            image_processor=Gemma3ImageProcessor(size={"height": image_size, "width": image_size}),
            tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, image_seq_length=tokens_per_side**2,
        )  # fmt: skip
        ids = tokenizer.convert_tokens_to_ids
        text = dict(
            vocab_size=len(tokenizer), hidden_size=heads * head_dim, intermediate_size=4 * heads * head_dim,
            num_hidden_layers=len(layer_types), num_attention_heads=heads, num_key_value_heads=kv_heads,
            head_dim=head_dim, query_pre_attn_scalar=3 * head_dim // 2, sliding_window=sliding_window,
            layer_types=list(layer_types), max_position_embeddings=512,
            pad_token_id=ids("<pad>"), eos_token_id=ids("<eos>"), bos_token_id=ids("<bos>"),
        )  # fmt: skip
        vision_width = 32
        vision = dict(
            model_type="siglip_vision_model", hidden_size=vision_width, intermediate_size=64,
            num_hidden_layers=vision_layers, num_attention_heads=2, image_size=image_size, patch_size=patch,
            vision_use_head=False,
        )  # fmt: skip
        config = Gemma3Config(
            text_config=text, vision_config=vision, mm_tokens_per_image=tokens_per_side**2,
            boi_token_index=ids(BOI), eoi_token_index=ids(EOI), image_token_index=ids(IMAGE),
        )  # fmt: skip
        model = Gemma3ForConditionalGeneration(config).eval()
        # HF initialises the projector to zeros (real weights overwrite it): every image token
        # would then carry the same zero key, and tests could not tell visual tokens apart.
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=vision_width**-0.5)
        if directory is not None:
            model.save_pretrained(directory)
            processor.save_pretrained(directory)
        return model, processor
