"""One head's attention over one sample's image: what a Head Impact IoU compares.

The image keeps its own colours (descriptions name them: "a green triangle"). Over it
the head's continuous attention is a map whose opacity grows with the score (low
attention leaves the image visible, high attention darkens it to its colour on the colour
bar: a dark hot end contrasts with any object colour but black, where a yellow one would
vanish over a yellow object), the object is outlined (its pixel mask), and the binarised
attention (score > the sample's mean) is a dashed contour drawn light on a dark stroke,
readable over any colour. `overlay_figure` puts the plain image with the
object and its token mask (coverage >= the store's threshold, the set IoU uses) beside
the overlay; `top_heads_figure` draws the N heads of highest HI on one sample as a grid.

The token grid is stretched over the whole image: right for adapters that resize the
image to the grid, approximate for ones that pad or crop. Without `picture`, the image
and mask are read from the dataset path recorded in the store (``attrs["dataset"]``).

>>> save(overlay_figure(open_store("stores/toy.zarr"), sample=0, layer=0, head=0), "o.png")  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np
import xarray as xr
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure, SubFigure
from matplotlib.lines import Line2D
from PIL import Image

from mechhi.data.format import DatasetError, load_dataset
from mechhi.figures.style import (
    ATTENTION_CMAP,
    PlotError,
    caption,
    figure_labels,
    new_figure,
    provenance_line,
    styled,
)
from mechhi.figures.summaries import scores, top_heads
from mechhi.store import attention_name, grid_coords, mask_name, store_views
from probes.head_impact import BinarizeRule, binarize_attention, binarize_mask, iou, layer_ranking

ALPHA_LOW, ALPHA_HIGH = 0.05, 0.75  # opacity of the attention map at the lowest and highest score
OBJECT_STYLE = {"colors": "white", "linewidths": 1.6, "linestyles": "solid"}
TOKEN_MASK_STYLE = {"colors": "#ffd54f", "linewidths": 1.4, "linestyles": "dotted"}
ATTENTION_BIN_STYLE = {"colors": "#4dd0e1", "linewidths": 1.6, "linestyles": "dashed"}
STROKE = [
    patheffects.withStroke(linewidth=3.2, foreground="black")
]  # light line on a dark stroke: reads on any colour
SUBSAMPLE = 16  # sub-cells per token side when a token set is contoured (edges within 1/32 token)
COLOUR_BAR_LABEL = "attention (mean over description tokens)"


@dataclass(frozen=True)
class OverlayMaps:
    """One sample and head on the sample's own main-view grid (rows, cols).

    ``attention`` is the score map; ``attention_bin`` and ``mask_bin`` are the token
    sets whose IoU is the sample's ``iou`` (binarised with the store's recorded rule,
    pooling every view exactly as the probe does).
    """

    attention: np.ndarray
    coverage: np.ndarray
    attention_bin: np.ndarray
    mask_bin: np.ndarray
    iou: float


@dataclass(frozen=True)
class Picture:
    """The sample's image and its object's pixel mask (bool, height x width)."""

    image: Image.Image
    mask: np.ndarray | None = None


# ---------------------------------------------------------------- maps from the store
def check_selection(ds: xr.Dataset, **chosen: int) -> None:
    """Refuse a sample / layer / head that the store does not have, naming what it has."""
    for dim, value in chosen.items():
        values = ds[dim].values
        if value not in values:
            have = f"{int(values.min())}..{int(values.max())}" if values.size else "none"
            raise PlotError(f"{dim} {value} is not in the store (its {dim}s: {have})")
    if "sample" in chosen and "done" in ds.data_vars and not bool(ds["done"].sel(sample=chosen["sample"])):
        raise PlotError(f"sample {chosen['sample']} has not been traced yet (done is False)")


def _own_grid(ds: xr.Dataset, view: str, sample: int, layer: int, head: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) attention and coverage of one view, cut to the sample's own grid."""
    rname, cname = grid_coords(view)
    one = ds.sel(sample=sample)
    rows, cols = int(one[rname]), int(one[cname])
    att = one[attention_name(view)].sel(layer=layer, head=head).values[:rows, :cols]
    cov = one[mask_name(view)].values[:rows, :cols]
    return np.asarray(att, dtype=np.float64), np.asarray(cov, dtype=np.float64)


def overlay_maps(ds: xr.Dataset, *, sample: int, layer: int, head: int) -> OverlayMaps:
    """Attention, coverage and their binarised token sets for one (sample, layer, head)."""
    if "attention" not in ds.data_vars:
        raise PlotError("store has no attention maps (it was traced with --no-maps)")
    check_selection(ds, sample=sample, layer=layer, head=head)
    grids = [_own_grid(ds, view, sample, layer, head) for view in store_views(ds)]  # main view first
    att = np.concatenate([a.ravel() for a, _ in grids])  # (V,) every view, as the probe pools them
    cov = np.concatenate([c.ravel() for _, c in grids])  # (V,)
    recorded = ds.attrs.get("binarize")
    rule = BinarizeRule.from_dict(recorded) if isinstance(recorded, dict) else BinarizeRule()
    a_bin, m_bin = binarize_attention(att, np.isfinite(cov)), binarize_mask(cov, rule)  # (V,) each
    main_att, main_cov = grids[0]
    n = main_att.size
    return OverlayMaps(
        main_att,
        main_cov,
        a_bin[:n].reshape(main_att.shape),
        m_bin[:n].reshape(main_att.shape),
        float(iou(a_bin, m_bin)),
    )


def sample_picture(ds: xr.Dataset, sample: int) -> Picture:
    """The sample's image and object mask, found through the dataset path in the store."""
    ref = str(ds.attrs.get("dataset") or "")
    path, sep, fingerprint = ref.rpartition("#")
    path = path if sep else ref
    image_id, object_id = (str(ds[c].sel(sample=sample).values) for c in ("image_id", "object_id"))
    if not path:
        raise PlotError("store records no dataset path; pass the image (picture=...)")
    try:
        data = load_dataset(path, check_images=False, skip_bad=True)
    except DatasetError as err:
        raise PlotError(
            f"cannot open the store's dataset {path}: {err}; pass the image (picture=...)"
        ) from None
    match = next((s for s in data.samples if s.image_id == image_id and s.object_id == object_id), None)
    if match is None:
        raise PlotError(
            f"dataset {path} has no image {image_id!r} object {object_id!r} (sample {sample}); "
            "pass the image (picture=...)"
        )
    if fingerprint and data.fingerprint != fingerprint:
        warnings.warn(
            f"dataset {path} changed since the store was traced (fingerprint differs)", stacklevel=3
        )
    try:
        return Picture(match.image(), match.mask())
    except (DatasetError, OSError) as err:
        raise PlotError(f"cannot load the image of sample {sample}: {err}") from None


# ---------------------------------------------------------------- drawing
def attention_cmap() -> ListedColormap:
    """The attention colour map with opacity rising from ALPHA_LOW to ALPHA_HIGH."""
    colours = matplotlib.colormaps[ATTENTION_CMAP](np.linspace(0.0, 1.0, 256))  # (256, 4)
    colours[:, 3] = np.linspace(ALPHA_LOW, ALPHA_HIGH, 256)
    return ListedColormap(colours, name="mechhi-attention")


def _extent(image: Image.Image) -> tuple[float, float, float, float]:
    """imshow extent that lays any grid over the image's pixel coordinates."""
    return (-0.5, image.width - 0.5, image.height - 0.5, -0.5)


def contour_cells(ax: Axes, cells: np.ndarray, image: Image.Image, style: dict) -> None:
    """Outline a boolean token set, token blocks stretched over the image."""
    if not cells.any():
        return
    rows, cols = cells.shape
    fine = np.kron(cells.astype(np.float64), np.ones((SUBSAMPLE, SUBSAMPLE)))  # (rows*S, cols*S)
    fine = np.pad(fine, 1)  # closed outlines at the image border
    x = (np.arange(-1, cols * SUBSAMPLE + 1) + 0.5) * image.width / (cols * SUBSAMPLE) - 0.5
    y = (np.arange(-1, rows * SUBSAMPLE + 1) + 0.5) * image.height / (rows * SUBSAMPLE) - 0.5
    ax.contour(x, y, fine, levels=[0.5], **style).set_path_effects(STROKE)


def contour_mask(ax: Axes, mask: np.ndarray | None, style: dict) -> None:
    """Outline a pixel mask (same size as the image; pixel (r, c) centred at x=c, y=r)."""
    if mask is None or not mask.any():
        return
    height, width = mask.shape
    padded = np.pad(mask.astype(np.float64), 1)  # closed outlines at the image border
    ax.contour(
        np.arange(-1, width + 1), np.arange(-1, height + 1), padded, levels=[0.5], **style
    ).set_path_effects(STROKE)


def show_image(ax: Axes, image: Image.Image) -> None:
    """The image in its own colours, no ticks or frame."""
    ax.imshow(image, interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)


def own_scale(maps: Sequence[OverlayMaps]) -> Normalize:
    """One colour scale from the lowest to the highest score of these maps."""
    finite = np.concatenate([m.attention[np.isfinite(m.attention)] for m in maps])
    return Normalize(float(finite.min()), float(finite.max()))


def draw_overlay(ax: Axes, picture: Picture, maps: OverlayMaps, norm: Normalize | None = None):
    """Image, attention map (on `norm`, default its own range), object outline, binarised
    attention; returns the map (for a colour bar)."""
    norm = norm or own_scale([maps])
    show_image(ax, picture.image)
    heat = ax.imshow(
        maps.attention,
        cmap=attention_cmap(),
        norm=norm,
        extent=_extent(picture.image),
        interpolation="nearest",
    )
    contour_mask(ax, picture.mask, OBJECT_STYLE)
    contour_cells(ax, maps.attention_bin, picture.image, ATTENTION_BIN_STYLE)
    ax.set_xlim(-0.5, picture.image.width - 0.5)
    ax.set_ylim(picture.image.height - 0.5, -0.5)
    return heat


FOOTER = 0.62  # inches under the panels: the legend and the caption


def _panels(fig: Figure, rows: int, cols: int) -> tuple[SubFigure, list[Axes], SubFigure]:
    """Panels (rows x cols) in a top part, and a footer part for the legend and the caption;
    each part lays itself out, so the colour bar and its label keep their room."""
    height = fig.get_figheight()
    top, footer = fig.subfigures(2, 1, height_ratios=[height - FOOTER, FOOTER])
    return top, list(top.subplots(rows, cols, squeeze=False).ravel()), footer


def _legend(footer: SubFigure, threshold: float, token_mask: bool) -> None:
    """What the outlines mean, at the top of the footer."""
    entries = [("object", OBJECT_STYLE, "-"), ("attention > mean", ATTENTION_BIN_STYLE, "--")]
    if token_mask:
        entries.insert(1, (f"token mask (coverage ≥ {threshold:g})", TOKEN_MASK_STYLE, ":"))
    handles = [
        Line2D([], [], color=s["colors"], linestyle=ls, linewidth=2, path_effects=STROKE, label=name)
        for name, s, ls in entries
    ]
    footer.legend(handles=handles, loc="upper center", ncols=len(handles), facecolor="0.55", frameon=True)


def _threshold(ds: xr.Dataset) -> float:
    rule = ds.attrs.get("binarize")
    return float(rule.get("mask_threshold", 0.5)) if isinstance(rule, dict) else 0.5


def _description(ds: xr.Dataset, sample: int) -> str:
    return f'"{ds["description"].sel(sample=sample).values}" (sample {sample})'


def _notes(ds: xr.Dataset, maps: OverlayMaps, label: str | None) -> list[str]:
    rows, cols = maps.attention.shape
    name = figure_labels([ds], None if label is None else [label])[0]
    return [f"{name}, token grid {rows}×{cols}; HI over {provenance_line(ds)}"]


@styled
def overlay_figure(
    ds: xr.Dataset,
    *,
    sample: int,
    layer: int,
    head: int,
    picture: Picture | None = None,
    label: str | None = None,
) -> Figure:
    """The image with its object and token mask, beside head (layer, head)'s attention on it;
    the caption names the store by `label` (default: its short model label)."""
    maps = overlay_maps(ds, sample=sample, layer=layer, head=head)
    picture = picture or sample_picture(ds, sample)
    fig = new_figure(7.0, 4.2)
    top, (left, right), footer = _panels(fig, 1, 2)
    show_image(left, picture.image)
    contour_mask(left, picture.mask, OBJECT_STYLE)
    contour_cells(left, maps.mask_bin, picture.image, TOKEN_MASK_STYLE)
    left.set_title("image and object")
    heat = draw_overlay(right, picture, maps)
    right.set_title(f"layer {layer} head {head}: IoU {maps.iou:.2f}")
    top.colorbar(heat, ax=right, label=COLOUR_BAR_LABEL, shrink=0.85)
    top.suptitle(_description(ds, sample))
    _legend(footer, _threshold(ds), token_mask=True)
    caption(footer, _notes(ds, maps, label), width=7.0)
    return fig


@styled
def top_heads_figure(
    ds: xr.Dataset,
    *,
    sample: int,
    n: int,
    columns: int = 4,
    picture: Picture | None = None,
    label: str | None = None,
) -> Figure:
    """The `n` heads of highest Head Impact on one sample, one shared attention scale."""
    check_selection(ds, sample=sample)
    heads = top_heads(ds, n)
    maps = [overlay_maps(ds, sample=sample, layer=l, head=h) for l, h, _ in heads]
    picture = picture or sample_picture(ds, sample)
    rows, cols = grid_shape(len(heads), columns)
    fig = new_figure(2.3 * cols + 1.0, 2.45 * rows + 1.0)
    top, axes, footer = _panels(fig, rows, cols)
    norm = own_scale(maps)
    for ax, (layer, head, hi), m in zip(axes, heads, maps):
        heat = draw_overlay(ax, picture, m, norm)
        ax.set_title(f"L{layer} H{head}: HI {hi:.2f}, IoU {m.iou:.2f}", fontsize=8.5)
    for ax in axes[len(heads) :]:
        ax.set_visible(False)
    top.colorbar(heat, ax=axes, label=COLOUR_BAR_LABEL, shrink=0.8)
    top.suptitle(f"{_description(ds, sample)}: the {len(heads)} heads of highest Head Impact")
    _legend(footer, _threshold(ds), token_mask=False)
    caption(footer, _notes(ds, maps[0], label), width=2.3 * cols + 1.0)
    return fig


def grid_shape(n: int, columns: int) -> tuple[int, int]:
    """(rows, cols) for `n` panels, at most `columns` wide, rows filled evenly (6 in 4 -> 2 x 3).

    >>> grid_shape(6, 4), grid_shape(8, 4), grid_shape(3, 4)
    ((2, 3), (2, 4), (1, 3))
    """
    rows = -(-n // max(1, min(columns, n)))
    return rows, -(-n // rows)


def choose_head(ds: xr.Dataset, layer: int | None = None, head: int | None = None) -> tuple[int, int]:
    """(layer, head) to draw: the given ones, else the best layer by mean HI and its best head."""
    layer = int(layer_ranking(ds).layer[0]) if layer is None else layer
    check_selection(ds, layer=layer)
    return layer, int(scores(ds).sel(layer=layer).idxmax()) if head is None else head
