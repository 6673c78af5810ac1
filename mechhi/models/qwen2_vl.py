"""Qwen2-VL and Qwen2.5-VL: variable-resolution images, 14 px patches merged 2x2.

The processor resizes the image (aspect ratio kept, both sides multiples of 28) and
emits ``image_grid_thw`` = (1, h, w) in 14 px patches; the language model sees
(h/2) x (w/2) ``<|image_pad|>`` tokens, row-major. The resize covers the whole image,
so the token grid spans the original image box.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


from ._common import AdapterError, VisualView, VLMAdapter
from ._tokenizer import word_level_tokenizer

SPECIAL_TOKENS = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Qwen2VLAdapter(VLMAdapter):
    family = "qwen2-vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    vision_tower = "model.visual"
    tiny_cases = {"gqa": {}, "mha": {"kv_heads": 4}, "qwen2.5": {"qwen25": True}}

    def visual_views(self, inputs: dict, index: int, image_size: tuple[int, int]) -> list[VisualView]:
        # One image per sample, so sample i owns row i of image_grid_thw.
        t, h, w = (int(x) for x in inputs["image_grid_thw"][index])
        merge = int(self.processor.image_processor.merge_size)
        if t != 1:
            raise AdapterError(f"qwen2-vl: expected one frame per image, got t={t}")
        rows, cols = h // merge, w // merge
        width, height = image_size
        positions = self.image_token_positions(inputs, index)
        return [VisualView("image", positions, (rows, cols), (0.0, 0.0, float(width), float(height)))]

    def grid_sizes(self, image_size: tuple[int, int]) -> dict[str, tuple[int, int]]:
        """The processor's own rule (`resized_size`); one token per merged patch."""
        resized = self.resized_size(image_size)
        if resized is None:
            return super().grid_sizes(image_size)
        image_processor = self.processor.image_processor
        side = int(image_processor.patch_size) * int(image_processor.merge_size)
        return {"image": (resized[1] // side, resized[0] // side)}

    def resized_size(self, image_size: tuple[int, int]) -> tuple[int, int] | None:
        """`smart_resize` to multiples of patch x merge pixels within the processor's pixel
        bounds (it raises for what the processor refuses, e.g. an aspect ratio over 200)."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        image_processor = self.processor.image_processor
        if not getattr(image_processor, "do_resize", True):
            return None
        patch, merge = int(image_processor.patch_size), int(image_processor.merge_size)
        size = image_processor.size
        width, height = image_size
        resized_h, resized_w = smart_resize(int(height), int(width), factor=patch * merge,
                                            min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])  # fmt: skip
        return resized_w, resized_h

    @classmethod
    def build_tiny(
        cls,
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
            words or [], SPECIAL_TOKENS, eos_token="<|im_end|>",
            extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        )  # fmt: skip
        size = {"shortest_edge": 28 * 28 * 4, "longest_edge": max_pixels}
        processor = Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(size=size),
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(),
            chat_template=CHAT_TEMPLATE,
        )
        ids = tokenizer.convert_tokens_to_ids
        quarter = head_dim // 4  # mrope sections (t, h, w) must sum to head_dim / 2
        text = dict(
            vocab_size=max(len(tokenizer), vocab_size or 0), hidden_size=heads * head_dim,
            intermediate_size=intermediate or 4 * heads * head_dim,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter]},
            pad_token_id=ids("<pad>"), eos_token_id=ids("<|im_end|>"), bos_token_id=ids("<|endoftext|>"),
            initializer_range=init_std,
        )  # fmt: skip
        vision = dict(
            depth=vision_depth, hidden_size=vision_width, num_heads=2, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, in_channels=3, initializer_range=init_std,
        )  # fmt: skip
        special = dict(
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        )  # fmt: skip
        if qwen25:
            from transformers import Qwen2_5_VLConfig as Config
            from transformers import Qwen2_5_VLForConditionalGeneration as Model

            vision.update(intermediate_size=2 * vision_width, out_hidden_size=heads * head_dim, fullatt_block_indexes=[0],
                          window_size=56)  # fmt: skip
        else:
            from transformers import Qwen2VLConfig as Config
            from transformers import Qwen2VLForConditionalGeneration as Model

            vision.update(embed_dim=vision_width, mlp_ratio=2, hidden_size=heads * head_dim)
        config = Config(text_config=text, vision_config=vision, **special)
        model = Model(config).eval()
        if directory is not None:
            model.save_pretrained(directory)
            processor.save_pretrained(directory)
        return model, processor
