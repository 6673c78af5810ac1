"""Head Impact profiles, the paper's Figure 5: the mean per layer (over heads) and per head
(over layers), each with its standard-error band (filled); the layer panel also has its
least-squares line (dashed). The head panel has none: head indices are nominal (head 3 is
not "after" head 2 in any sense), so a slope across them would be an artefact of numbering.

`layers_figure` draws both panels; with several stores the layer panel puts relative
depth (layer / (n_layers - 1)) on the x axis, so models of different depth line up.
`compare_figure` is that depth panel alone: models compared by relative depth.

>>> save(layers_figure([open_store("stores/toy.zarr")]), "layers.png")  # doctest: +SKIP
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from mechhi.figures.style import (
    COLOURS,
    PlotError,
    caption,
    figure_labels,
    new_figure,
    provenance_notes,
    styled,
)
from mechhi.figures.summaries import profile

BAND_ALPHA = 0.22
NAMES = {"head_impact": "Head Impact"}


def _x(summary: xr.Dataset, along: str, on_depth: bool) -> np.ndarray:
    """The x positions of a profile: layer index, head index, or relative depth."""
    if along == "layer" and on_depth:
        if "depth" not in summary.coords:
            raise PlotError("a store has no 'depth' coordinate: models cannot be aligned on relative depth")
        return summary["depth"].values.astype(np.float64)
    return summary[along].values.astype(np.float64)


def draw_profile(
    ax: Axes, summary: xr.Dataset, *, along: str, colour, label: str, on_depth: bool, fit: bool = True
) -> None:
    """Line with dots, ± SE band and (with `fit`, where the profile has a line: layers only)
    the dashed least-squares line, in one colour."""
    x, mean = _x(summary, along, on_depth), summary["mean"].values
    se = np.nan_to_num(summary["se"].values)  # a single-value point gets no band
    ok = np.isfinite(mean)
    ax.fill_between(x[ok], (mean - se)[ok], (mean + se)[ok], color=colour, alpha=BAND_ALPHA, linewidth=0)
    ax.plot(x[ok], mean[ok], "-o", color=colour, label=label)
    slope, intercept = summary.attrs.get("slope", np.nan), summary.attrs.get("intercept", np.nan)
    if fit and np.isfinite(slope):
        index = summary[along].values.astype(np.float64)
        ends = [0, len(index) - 1]
        ax.plot(
            x[ends],
            intercept + slope * index[ends],
            "--",
            color=colour,
            linewidth=1.1,
            label=f"least squares, slope {slope:+.4f} per {along}",
        )


def _profile_panel(
    ax: Axes,
    stores: Sequence[xr.Dataset],
    labels: Sequence[str],
    *,
    along: str,
    on_depth: bool,
    variable: str,
    fit: bool = True,
) -> None:
    for k, (ds, label) in enumerate(zip(stores, labels)):
        draw_profile(
            ax,
            profile(ds, along, variable),
            along=along,
            colour=COLOURS[k % len(COLOURS)],
            label=label,
            on_depth=on_depth,
            fit=fit,
        )
    name = NAMES.get(variable, variable)
    other = "heads" if along == "layer" else "layers"
    ax.set_ylabel(f"mean {name}\n(± SE over {other})")
    ax.set_xlabel("relative depth, layer / (n_layers − 1)" if on_depth and along == "layer" else along)
    if not (on_depth and along == "layer"):
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, axis="y")
    ax.legend(loc="best")


def _check(stores: Sequence[xr.Dataset]) -> None:
    if not stores:
        raise PlotError("no stores given")


@styled
def layers_figure(
    stores: Sequence[xr.Dataset], *, variable: str = "head_impact", labels: Sequence[str] | None = None
) -> Figure:
    """Figure 5: mean per layer (top, with its regression line) and per head (bottom), with bands."""
    _check(stores)
    labels = figure_labels(stores, labels)
    on_depth = len(stores) > 1
    fig = new_figure(6.4, 6.2)
    top, bottom = fig.subplots(2, 1)
    _profile_panel(top, stores, labels, along="layer", on_depth=on_depth, variable=variable)
    _profile_panel(bottom, stores, labels, along="head", on_depth=on_depth, variable=variable, fit=False)
    name = NAMES.get(variable, variable)
    top.set_title(f"{name} per layer")
    bottom.set_title(f"{name} per head")
    fig.suptitle(textwrap.shorten(f"Mean {name}: {', '.join(labels)}", 90))
    caption(fig, provenance_notes(stores, labels), width=6.4)
    return fig


@styled
def compare_figure(
    stores: Sequence[xr.Dataset], *, variable: str = "head_impact", labels: Sequence[str] | None = None
) -> Figure:
    """Mean per layer against relative depth, one line with its ± SE band per store, named by
    `labels` (one per store, else the short model labels)."""
    _check(stores)
    labels = figure_labels(stores, labels)
    counts = [f"{label} ({ds.sizes['layer']} layers)" for label, ds in zip(labels, stores)]
    fig = new_figure(6.4, 3.8)
    ax = fig.subplots()
    _profile_panel(ax, stores, counts, along="layer", on_depth=True, variable=variable, fit=False)
    ax.set_xlim(-0.03, 1.03)
    ax.set_title(f"Mean {NAMES.get(variable, variable)} per layer, models by relative depth")
    caption(fig, provenance_notes(stores, labels), width=6.4)
    return fig
