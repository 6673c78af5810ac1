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
from typing import Any

from mechhi.models._common import AdapterError, VisualView, VLMAdapter


class Gemma3Adapter(VLMAdapter):
    family = "gemma3"
    model_types = ("gemma3",)
    variable_image_size = False

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
