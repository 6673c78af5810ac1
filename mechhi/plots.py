"""Figures, drawn with PIL only (no plotting stack needed on a headless machine).

`sample_sheet` draws dataset samples with their masks (for ``mechhi dataset show``);
`heatmap` draws a (layer x head) Head Impact table as a colour grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .data.format import Sample

MASK_TINT = np.array([255, 0, 200], dtype=np.float32)


def overlay_mask(image: Image.Image, mask: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The image with the mask tinted magenta and its outline kept visible."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    tinted = np.where(mask[..., None], (1 - alpha) * pixels + alpha * MASK_TINT, pixels)
    return Image.fromarray(tinted.astype(np.uint8))


def sample_sheet(samples: Sequence[Sample], out: str | Path, *, tile: int = 224, columns: int = 4) -> Path:
    """A contact sheet of samples: image with its object mask, description below."""
    rows = max(1, -(-len(samples) // columns))
    caption_height = 18
    sheet = Image.new("RGB", (columns * tile, rows * (tile + caption_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, sample in enumerate(samples):
        picture = overlay_mask(sample.image(), sample.mask())
        picture.thumbnail((tile, tile))
        x, y = (i % columns) * tile, (i // columns) * (tile + caption_height)
        sheet.paste(picture, (x, y))
        draw.text((x + 3, y + tile + 3), sample.description[:40], fill="black")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def heatmap(values: np.ndarray, out: str | Path, *, cell: int = 16) -> Path:
    """(rows, cols) values as a viridis-like grid; NaN drawn grey."""
    finite = np.isfinite(values)
    lo, hi = (np.nanmin(values), np.nanmax(values)) if finite.any() else (0.0, 1.0)
    scaled = np.where(finite, (values - lo) / (hi - lo or 1.0), 0.0)
    colours = np.stack([68 + 185 * scaled, 1 + 230 * scaled, 84 - 50 * scaled], axis=-1)
    colours[~finite] = 160
    image = Image.fromarray(colours.astype(np.uint8)).resize(
        (values.shape[1] * cell, values.shape[0] * cell), Image.NEAREST
    )
    out = Path(out)
    image.save(out)
    return out
