"""LLaVA-1.5: a CLIP ViT on a centre crop, one ``<image>`` token per patch.

The CLIP image processor resizes the image (shortest edge to ``size["shortest_edge"]``,
aspect ratio kept) and then centre-crops ``crop_size``; the vision tower cuts the crop
into patches and LLaVA drops the CLS token (``vision_feature_select_strategy ==
"default"``), so the language model sees (crop / patch)^2 ``<image>`` tokens, row-major.

The token grid therefore does *not* span the whole image: it spans the crop, and the
crop's box in original-image pixels differs from image to image. `crop_box` replays
the processor's geometry (optional pad-to-square, resize, centre crop) from its own
config, so an object mask is carried onto exactly the pixels the patches saw.
"""

from __future__ import annotations

from typing import Any

from mechhi.models._common import AdapterError, VisualView, VLMAdapter

Box = tuple[float, float, float, float]


def _resized_size(width: int, height: int, size: Any) -> tuple[int, int]:
    """(new_width, new_height) of the processor's resize, as `get_resize_output_image_size` computes it."""
    shortest = _size_field(size, "shortest_edge")
    longest = _size_field(size, "longest_edge")
    fixed = (_size_field(size, "height"), _size_field(size, "width"))
    if shortest and not longest:
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(shortest * long / short)
        return (shortest, new_long) if width <= height else (new_long, shortest)
    if all(fixed) and not shortest:
        return fixed[1], fixed[0]
    raise AdapterError(f"llava: unsupported image-processor size {dict(_size_items(size))}")


def _size_field(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def _size_items(size: Any) -> dict[str, Any]:
    keys = ("shortest_edge", "longest_edge", "height", "width", "max_height", "max_width")
    return {k: _size_field(size, k) for k in keys if _size_field(size, k)}


def crop_box(image_size: tuple[int, int], image_processor: Any) -> Box:
    """The region of the original image (x0, y0, x1, y1 pixels) that ends up in ``pixel_values``.

    Replays, per axis, the affine steps of the CLIP/LLaVA image processors: pad to a
    centred square (``do_pad``, LLaVA's own processor), resize (a linear map of
    [0, w] onto [0, new_w]), centre crop at ``int((new - crop) / 2)``. A crop larger
    than the resized image is padded, and the torch and PIL backends pad by a pixel
    differently, so that case is refused rather than guessed.
    """
    width, height = image_size
    pad_x = pad_y = 0
    if getattr(image_processor, "do_pad", False):
        side = max(width, height)
        pad_x, pad_y = (side - width) // 2, (side - height) // 2
        width = height = side
    new_w, new_h = width, height
    if image_processor.do_resize:
        new_w, new_h = _resized_size(width, height, image_processor.size)
    left, top, crop_w, crop_h = 0, 0, new_w, new_h
    if image_processor.do_center_crop:
        crop = image_processor.crop_size
        crop_h, crop_w = _size_field(crop, "height"), _size_field(crop, "width")
        if crop_w > new_w or crop_h > new_h:
            raise AdapterError(
                f"llava: crop {crop_w}x{crop_h} is larger than the resized image {new_w}x{new_h}; "
                "padded crops are not supported"
            )
        left, top = int((new_w - crop_w) / 2.0), int((new_h - crop_h) / 2.0)
    sx, sy = new_w / width, new_h / height  # resized pixels per (padded) original pixel
    return (
        left / sx - pad_x,
        top / sy - pad_y,
        (left + crop_w) / sx - pad_x,
        (top + crop_h) / sy - pad_y,
    )


class LlavaAdapter(VLMAdapter):
    family = "llava"
    model_types = ("llava",)

    def visual_views(self, inputs: dict, index: int, image_size: tuple[int, int]) -> list[VisualView]:
        patch = int(self.config.vision_config.patch_size)
        height, width = (int(s) for s in inputs["pixel_values"].shape[-2:])
        if height % patch or width % patch:
            raise AdapterError(f"llava: pixel_values {height}x{width} are not a multiple of patch {patch}")
        rows, cols = height // patch, width // patch
        positions = self.image_token_positions(inputs, index)
        strategy = self.config.vision_feature_select_strategy
        if strategy == "full":
            positions = positions[1:]  # the CLS feature comes first and has no grid cell
        elif strategy != "default":
            raise AdapterError(f"llava: unknown vision_feature_select_strategy {strategy!r}")
        if len(positions) != rows * cols:
            raise AdapterError(
                f"llava: sample {index} has {len(positions)} image tokens for a {rows}x{cols} patch grid"
            )
        box = crop_box(image_size, self.processor.image_processor)
        return [VisualView("image", positions, (rows, cols), box)]
