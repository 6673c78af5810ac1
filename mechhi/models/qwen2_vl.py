"""Qwen2-VL and Qwen2.5-VL: variable-resolution images, 14 px patches merged 2x2.

The processor resizes the image (aspect ratio kept, both sides multiples of 28) and
emits ``image_grid_thw`` = (1, h, w) in 14 px patches; the language model sees
(h/2) x (w/2) ``<|image_pad|>`` tokens, row-major. The resize covers the whole image,
so the token grid spans the original image box.
"""

from __future__ import annotations

from mechhi.models._common import AdapterError, VisualView, VLMAdapter


class Qwen2VLAdapter(VLMAdapter):
    family = "qwen2-vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    vision_tower = "model.visual"

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
        resized_h, resized_w = smart_resize(
            int(height),
            int(width),
            factor=patch * merge,
            min_pixels=size["shortest_edge"],
            max_pixels=size["longest_edge"],
        )
        return resized_w, resized_h
