"""The (layer x head) Head Impact heatmap, the paper's Figure 4.

Several stores become panels side by side on one shared colour scale, so a colour means
the same HI in every panel (models of different depth keep their own layer axis). Layer
0 is the top row, as in a table; cells carry their value when the grid is small enough
to read it; NaN (a head never scored) is light grey.

>>> save(heatmap_figure([open_store("stores/toy.zarr")]), "hi.png")  # doctest: +SKIP
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib
import numpy as np
import xarray as xr
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from mechhi.figures.style import PlotError, caption, figure_labels, new_figure, provenance_notes, styled
from mechhi.figures.summaries import scores

NAN_COLOUR = "0.85"
ANNOTATE_MAX_CELLS = 24 * 16  # above this, numbers in cells are unreadable
COLOUR_BAR_LABEL = {"head_impact": "Head Impact (mean IoU over samples)"}


def shared_norm(arrays: Sequence[np.ndarray]) -> Normalize:
    """One colour scale over every panel: finite minimum to finite maximum."""
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays])
    lo, hi = float(finite.min()), float(finite.max())
    return Normalize(lo, hi if hi > lo else lo + 1e-9)


def _annotate(ax, values: np.ndarray, norm: Normalize, cmap) -> None:
    """Each cell's value, white on dark colours and black on light ones."""
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            r, g, b, _ = cmap(norm(v))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            ax.text(
                j, i, f"{v:.2f}", ha="center", va="center", fontsize=6.5, color="white" if dark else "black"
            )


def _panel(ax, hi: xr.DataArray, norm: Normalize, cmap, title: str, width: float):
    values = hi.values  # (layer, head)
    image = ax.imshow(values, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_title(
        textwrap.fill(title, max(12, int(width * 72 / (10 * 0.58))), break_on_hyphens=False)
    )  # 10 pt
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(values.shape[1]), [str(h) for h in hi["head"].values])
    step = max(1, int(np.ceil(values.shape[0] / 16)))
    ax.set_yticks(range(0, values.shape[0], step), [str(l) for l in hi["layer"].values[::step]])
    ax.tick_params(length=0)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    if values.size <= ANNOTATE_MAX_CELLS:
        _annotate(ax, values, norm, cmap)
    return image


@styled
def heatmap_figure(
    stores: Sequence[xr.Dataset], *, variable: str = "head_impact", labels: Sequence[str] | None = None
) -> Figure:
    """One panel per store of `variable` (layer x head), one colour bar shared by all; each
    panel titled by its label (`labels`, one per store, else the short model labels)."""
    if not stores:
        raise PlotError("heatmap: no stores given")
    labels = figure_labels(stores, labels)
    grids = [scores(ds, variable) for ds in stores]
    norm = shared_norm([g.values for g in grids])
    cmap = matplotlib.colormaps[matplotlib.rcParams["image.cmap"]].with_extremes(bad=NAN_COLOUR)
    widths = [min(6.0, max(1.5, 0.42 * g.sizes["head"])) for g in grids]
    height = min(9.0, max(3.2, 0.26 * max(g.sizes["layer"] for g in grids) + 1.2))
    width = sum(widths) + 1.4
    fig = new_figure(width, height + 0.6)
    axes = fig.subplots(1, len(grids), width_ratios=widths, squeeze=False)[0]
    images = [_panel(ax, g, norm, cmap, label, w) for ax, g, label, w in zip(axes, grids, labels, widths)]
    fig.colorbar(images[0], ax=list(axes), label=COLOUR_BAR_LABEL.get(variable, variable), fraction=0.08)
    fig.suptitle("Head Impact per head" if variable == "head_impact" else variable)
    notes = provenance_notes(stores, labels)
    if any(np.isnan(g.values).any() for g in grids):
        notes.append("grey: head not scored")
    caption(fig, notes, width=width)
    return fig
