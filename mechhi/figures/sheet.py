"""A dataset's contact sheet (``mechhi dataset show --png``): samples in their own colours,
each object outlined (white on a black stroke, readable on any colour) and titled by its
description, so "a green triangle" is seen green.

>>> save(sheet_figure(load_dataset("data/toy").samples[:8]), "sheet.png")  # doctest: +SKIP
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from mechhi.data.format import Sample
from mechhi.figures.overlay import OBJECT_STYLE, Picture, contour_mask, grid_shape, show_image
from mechhi.figures.style import PlotError, new_figure, save, styled

SHEET_DPI = 90  # a preview: 180 px a sample


@styled
def sheet_figure(samples: Sequence[Sample], *, columns: int = 4, title: str | None = None) -> Figure:
    """Samples in a grid of `columns`: image, object outline, description."""
    if not samples:
        raise PlotError("contact sheet: no samples to draw")
    rows, cols = grid_shape(len(samples), columns)
    fig = new_figure(2.0 * cols, 2.25 * rows + (0.35 if title else 0.0))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, sample in zip(axes, samples):
        picture = Picture(sample.image(), sample.mask())
        show_image(ax, picture.image)
        contour_mask(ax, picture.mask, OBJECT_STYLE)
        ax.set_title(textwrap.shorten(sample.description, 34), fontsize=8)
    for ax in axes[len(samples) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return fig


def sample_sheet(
    samples: Sequence[Sample], out: str | Path, *, columns: int = 4, dpi: int = SHEET_DPI
) -> Path:
    """Write the contact sheet of `samples` to `out` (PNG, SVG or PDF by extension; images of
    photographs make large PNGs, hence the modest default DPI)."""
    return save(sheet_figure(samples, columns=columns), out, dpi=dpi)
