"""Figures, drawn with PIL only (no plotting stack needed on a headless machine).

Why PIL: mechhi runs where models run (servers, containers), and a figure must not cost
a matplotlib install. Everything here is raster drawing on a white canvas: a viridis
colour map, axes with tick labels, colour bars, dashed lines.

Figures of a store (each takes an opened store, ``mechhi.store.open_store``, and an
output path, and returns the path):

- `plot_heatmap`: Head Impact as a (layer x head) colour grid (``mechhi plot heatmap``).
- `plot_layers`: mean HI per layer with a standard-error band and the least-squares line
  (the paper's Fig. 5, top).
- `plot_overlay`: one sample's attention map of one head on its image, beside the
  binarised attention and the token mask that its IoU compares.
- `plot_compare`: mean HI per layer against relative depth, one line per store.

Dataset figures: `sample_sheet` (``mechhi dataset show``) and the raw `heatmap` of a
2-D array.

>>> plot_heatmap(open_store("stores/toy.zarr"), "hi.png")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
from PIL import Image, ImageDraw, ImageFont

from .data.format import DatasetError, Sample, load_dataset
from .store import attention_name, grid_coords, mask_name, store_views, unique_labels

MASK_TINT = np.array([255, 0, 200], dtype=np.float32)
ATTENTION_TINT = np.array([255, 110, 0], dtype=np.float32)
NAN_GREY = (160, 160, 160)
BAND = (205, 222, 240)  # the standard-error band: a light tint of the line colour
# Line colours of plot_compare (and plot_layers' first), distinct at a glance.
PALETTE = [
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (148, 103, 189),
    (255, 127, 14),
    (140, 86, 75),
    (227, 119, 194),
    (23, 190, 207),
    (188, 189, 34),
    (90, 90, 90),
]
# matplotlib's viridis sampled at 0, 1/8, ..., 1: perceptually even, readable in grey.
VIRIDIS = np.array(
    [
        (68, 1, 84),
        (71, 44, 122),
        (59, 81, 139),
        (44, 113, 142),
        (33, 144, 141),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ],
    dtype=np.float64,
)


class PlotError(ValueError):
    """A figure that cannot be drawn from this store (missing variable, bad selection)."""


# ---------------------------------------------------------------- dataset figures
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
    return _save(sheet, out)


def heatmap(values: np.ndarray, out: str | Path, *, cell: int = 16) -> Path:
    """(rows, cols) values as a bare viridis grid (no axes); NaN drawn grey."""
    colours = colormap(_scale(values, *_range(values)))  # (rows, cols, 3)
    image = Image.fromarray(colours).resize((values.shape[1] * cell, values.shape[0] * cell), Image.NEAREST)
    return _save(image, out)


# ---------------------------------------------------------------- colour
def colormap(scaled: np.ndarray) -> np.ndarray:
    """Values in 0..1 (NaN allowed) -> uint8 (..., 3) viridis colours; NaN is grey.

    >>> colormap(np.array([0.0, 1.0, np.nan])).tolist()
    [[68, 1, 84], [253, 231, 37], [160, 160, 160]]
    """
    scaled = np.asarray(scaled, dtype=np.float64)
    finite = np.isfinite(scaled)
    t = np.clip(np.where(finite, scaled, 0.0), 0.0, 1.0)
    anchors = np.linspace(0.0, 1.0, len(VIRIDIS))
    rgb = np.stack([np.interp(t, anchors, VIRIDIS[:, c]) for c in range(3)], axis=-1)  # (..., 3)
    rgb[~finite] = NAN_GREY
    return np.rint(rgb).astype(np.uint8)


def _range(values: np.ndarray) -> tuple[float, float]:
    """(min, max) of the finite values; (0, 1) when there are none."""
    finite = np.asarray(values)[np.isfinite(values)]
    return (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Values mapped so lo -> 0 and hi -> 1 (all 0 when hi == lo); NaN stays NaN."""
    return (np.asarray(values, dtype=np.float64) - lo) / (hi - lo if hi > lo else 1.0)


# ---------------------------------------------------------------- drawing primitives
@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at `size` px (the fixed bitmap font if FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def _text(
    draw: ImageDraw.ImageDraw,
    xy: tuple[float, float],
    text: str,
    *,
    anchor: str = "lt",
    size: int = 13,
    fill: tuple[int, int, int] | str = "black",
) -> None:
    """Text placed by its box: anchor = horizontal (l/m/r) + vertical (t/m/b).

    Done by measuring instead of Pillow's own anchors, which the bitmap fallback lacks.
    """
    font = _font(size)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    dx = {"l": 0.0, "m": 0.5, "r": 1.0}[anchor[0]] * (x1 - x0) + x0
    dy = {"t": 0.0, "m": 0.5, "b": 1.0}[anchor[1]] * (y1 - y0) + y0
    draw.text((xy[0] - dx, xy[1] - dy), text, font=font, fill=fill)


def _vertical_text(canvas: Image.Image, xy: tuple[int, int], text: str, *, size: int = 13) -> None:
    """Text rotated 90 degrees counter-clockwise, centred on `xy` (for y-axis labels)."""
    font = _font(size)
    x0, y0, x1, y1 = ImageDraw.Draw(canvas).textbbox((0, 0), text, font=font)
    label = Image.new("L", (x1 + 2, y1 + 2), 0)
    ImageDraw.Draw(label).text((0, 0), text, font=font, fill=255)
    label = label.crop((x0, y0, x1, y1)).rotate(90, expand=True)
    box = (int(xy[0] - label.width / 2), int(xy[1] - label.height / 2))
    canvas.paste(Image.new("RGB", label.size, "black"), box, label)


def _dashed(
    draw: ImageDraw.ImageDraw,
    p0: tuple[float, float],
    p1: tuple[float, float],
    *,
    fill: tuple[int, int, int],
    width: int = 2,
    dash: float = 9.0,
    gap: float = 6.0,
) -> None:
    """A dashed straight line from p0 to p1 (PIL has only solid lines)."""
    length = math.dist(p0, p1)
    if length == 0:
        return
    ux, uy = (p1[0] - p0[0]) / length, (p1[1] - p0[1]) / length
    start = 0.0
    while start < length:
        stop = min(start + dash, length)
        draw.line(
            [(p0[0] + ux * start, p0[1] + uy * start), (p0[0] + ux * stop, p0[1] + uy * stop)],
            fill=fill,
            width=width,
        )
        start = stop + gap


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values (steps of 1, 2 or 5 x 10^k) covering lo..hi.

    >>> nice_ticks(0.12, 0.48)
    [0.1, 0.2, 0.3, 0.4, 0.5]
    """
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / max(n - 1, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 10) for k in range(first, last + 1)]


def _tick_label(value: float, step: float) -> str:
    """A tick value with as many decimals as the tick step needs."""
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 2
    return f"{value:.{decimals}f}"


def _save(image: Image.Image, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG")
    return out


# ---------------------------------------------------------------- axes for line plots
@dataclass(frozen=True)
class _Axes:
    """A data rectangle mapped onto a pixel box (left, top, right, bottom)."""

    box: tuple[int, int, int, int]
    x_ticks: list[float]
    y_ticks: list[float]

    def px(self, x: float, y: float) -> tuple[float, float]:
        """Pixel position of data point (x, y); y grows upwards."""
        left, top, right, bottom = self.box
        (x0, x1), (y0, y1) = (self.x_ticks[0], self.x_ticks[-1]), (self.y_ticks[0], self.y_ticks[-1])
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    def draw(self, canvas: Image.Image, *, x_label: str, y_label: str, x_format=None) -> None:
        """Frame, light grid, tick labels and axis labels."""
        draw = ImageDraw.Draw(canvas)
        left, top, right, bottom = self.box
        y_step = self.y_ticks[1] - self.y_ticks[0]
        for y in self.y_ticks:
            _, py = self.px(self.x_ticks[0], y)
            draw.line([(left, py), (right, py)], fill=(232, 232, 232))
            _text(draw, (left - 6, py), _tick_label(y, y_step), anchor="rm", size=12)
        for x in self.x_ticks:
            px, _ = self.px(x, self.y_ticks[0])
            draw.line([(px, bottom), (px, bottom + 4)], fill="black")
            label = x_format(x) if x_format else _tick_label(x, self.x_ticks[1] - self.x_ticks[0])
            _text(draw, (px, bottom + 7), label, anchor="mt", size=12)
        draw.rectangle(self.box, outline="black")
        _text(draw, ((left + right) / 2, bottom + 28), x_label, anchor="mt", size=14)
        _vertical_text(canvas, (left - 52, (top + bottom) // 2), y_label, size=14)


def _line_canvas(title: str, width: int = 760, height: int = 480, legend_width: int = 0):
    """White canvas with a title; returns (canvas, pixel box of the plot area)."""
    canvas = Image.new("RGB", (width + legend_width, height), "white")
    _text(ImageDraw.Draw(canvas), ((width + legend_width) / 2, 14), title, anchor="mt", size=16)
    return canvas, (80, 50, width - 30, height - 70)


def _series(
    draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], colour: tuple[int, int, int]
) -> None:
    """Points joined by a solid line, each point a small disc."""
    if len(points) > 1:
        draw.line(points, fill=colour, width=3, joint="curve")
    for x, y in points:
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)


def _legend(
    canvas: Image.Image, xy: tuple[int, int], entries: list[tuple[str, tuple[int, int, int], str]]
) -> None:
    """Entries (label, colour, style: "line" | "dashed" | "band") stacked from `xy`."""
    draw = ImageDraw.Draw(canvas)
    x, y = xy
    for label, colour, style in entries:
        if style == "band":
            draw.rectangle([x, y - 6, x + 26, y + 6], fill=colour)
        elif style == "dashed":
            _dashed(draw, (x, y), (x + 26, y), fill=colour, width=2, dash=7, gap=4)
        else:
            draw.line([(x, y), (x + 26, y)], fill=colour, width=3)
        _text(draw, (x + 34, y), label, anchor="lm", size=13)
        y += 22


# ---------------------------------------------------------------- store helpers
def _scores(ds: xr.Dataset, variable: str = "head_impact") -> xr.DataArray:
    """`variable` as a (layer, head) array, with a clear error if the store lacks it."""
    if variable not in ds.data_vars:
        raise PlotError(
            f"store has no '{variable}' (score it first: mechhi rank --store ...); "
            f"variables: {sorted(map(str, ds.data_vars))}"
        )
    da = ds[variable]
    if set(da.dims) != {"layer", "head"}:
        raise PlotError(f"'{variable}' has dims {da.dims}; these figures need (layer, head)")
    da = da.transpose("layer", "head").load()
    if not np.isfinite(da.values).any():
        raise PlotError(f"'{variable}' is all NaN (no sample traced and scored yet?)")
    return da


def _model_name(ds: xr.Dataset) -> str:
    return str(ds.attrs.get("model", "unknown model"))


def layer_summary(ds: xr.Dataset, variable: str = "head_impact") -> xr.Dataset:
    """Per layer: ``mean`` HI over heads, its standard error ``se`` over heads (NaN with
    fewer than two heads scored), ``n_heads``; attrs ``slope`` / ``intercept`` of the
    least-squares line of mean on layer (NaN with fewer than two layers).

    NaN heads (never scored) are skipped, as in `probes.head_impact.layer_ranking`.
    """
    hi = _scores(ds, variable)
    values = hi.values  # (layer, head)
    n = np.isfinite(values).sum(1)  # (layer,)
    with warnings.catch_warnings():  # all-NaN layers and single-head layers give NaN on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, axis=1)
        se = np.where(n > 1, np.nanstd(values, axis=1, ddof=1) / np.sqrt(np.maximum(n, 1)), np.nan)
    layers = hi["layer"].values.astype(np.float64)
    ok = np.isfinite(mean)
    slope, intercept = np.polyfit(layers[ok], mean[ok], 1) if ok.sum() > 1 else (np.nan, np.nan)
    coords = {"layer": hi["layer"]}
    if "depth" in hi.coords:
        coords["depth"] = hi["depth"]
    out = xr.Dataset({"mean": ("layer", mean), "se": ("layer", se), "n_heads": ("layer", n)}, coords=coords)
    out.attrs = {"slope": float(slope), "intercept": float(intercept)}
    return out


# ---------------------------------------------------------------- heatmap
@dataclass(frozen=True)
class HeatmapGeometry:
    """Where `plot_heatmap` puts things: grid origin and cell size, colour-bar box
    (left, top, right, bottom; right/bottom exclusive) and canvas size."""

    left: int
    top: int
    cell: int
    n_rows: int
    n_cols: int
    bar: tuple[int, int, int, int]
    size: tuple[int, int]

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Pixel box (left, top, right, bottom; exclusive) of grid cell (row, col)."""
        x, y = self.left + col * self.cell, self.top + row * self.cell
        return (x, y, x + self.cell, y + self.cell)


def heatmap_geometry(n_rows: int, n_cols: int) -> HeatmapGeometry:
    """Layout of a (n_rows x n_cols) heatmap: cells of 8..40 px, so 28 x 28 stays ~560 px."""
    cell = int(np.clip(560 // max(n_rows, n_cols), 8, 40))
    left, top = 80, 50
    width, height = n_cols * cell, n_rows * cell
    bar_height = max(height, 160)
    bar = (left + width + 24, top, left + width + 42, top + bar_height)
    size = (max(bar[2] + 70, 360), top + max(height, bar_height) + 70)
    return HeatmapGeometry(left, top, cell, n_rows, n_cols, bar, size)


def _tick_every(cell: int, label_px: int) -> int:
    """Label every k-th row/column so that labels of `label_px` never overlap."""
    return max(1, math.ceil(label_px / cell))


def _heatmap_axes(draw: ImageDraw.ImageDraw, g: HeatmapGeometry, rows: np.ndarray, cols: np.ndarray) -> None:
    """Layer labels left of the grid, head labels below it."""
    for i in range(0, g.n_rows, _tick_every(g.cell, 15)):
        x0, y0, _, y1 = g.cell_box(i, 0)
        _text(draw, (x0 - 6, (y0 + y1) / 2), str(rows[i]), anchor="rm", size=12)
    for j in range(0, g.n_cols, _tick_every(g.cell, 26)):
        x0, _, x1, _ = g.cell_box(g.n_rows - 1, j)
        _text(draw, ((x0 + x1) / 2, g.top + g.n_rows * g.cell + 6), str(cols[j]), anchor="mt", size=12)


def _colour_bar(canvas: Image.Image, box: tuple[int, int, int, int], lo: float, hi: float) -> None:
    """Vertical gradient: top row is exactly the colour of `hi`, bottom row that of `lo`."""
    left, top, right, bottom = box
    t = np.linspace(1.0, 0.0, bottom - top)  # (bar height,) top to bottom
    strip = np.repeat(colormap(t)[:, None, :], right - left, axis=1)  # (height, width, 3)
    canvas.paste(Image.fromarray(strip), (left, top))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([left - 1, top - 1, right, bottom], outline="black")
    ticks = [v for v in nice_ticks(lo, hi, 5) if lo - 1e-12 <= v <= hi + 1e-12] if hi > lo else [lo]
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 0.1
    for v in ticks:
        y = bottom - 1 - (v - lo) / (hi - lo if hi > lo else 1.0) * (bottom - top - 1)
        draw.line([(right, y), (right + 4, y)], fill="black")
        _text(draw, (right + 7, y), _tick_label(v, step), anchor="lm", size=12)


def plot_heatmap(
    ds: xr.Dataset,
    out: str | Path,
    *,
    variable: str = "head_impact",
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """(layer x head) grid of `variable`, viridis from `vmin` (default: lowest value) to
    `vmax` (default: highest), NaN grey; layers are rows (layer 0 on top).

    >>> plot_heatmap(open_store("stores/toy.zarr"), "hi.png")  # doctest: +SKIP
    """
    hi = _scores(ds, variable)
    data_lo, data_hi = _range(hi.values)
    lo, top = data_lo if vmin is None else vmin, data_hi if vmax is None else vmax
    g = heatmap_geometry(*hi.shape)
    canvas = Image.new("RGB", g.size, "white")
    cells = colormap(_scale(hi.values, lo, top))  # (layer, head, 3)
    grid = Image.fromarray(cells).resize((g.n_cols * g.cell, g.n_rows * g.cell), Image.NEAREST)
    canvas.paste(grid, (g.left, g.top))
    draw = ImageDraw.Draw(canvas)
    _text(draw, (g.size[0] / 2, 14), f"{variable} - {_model_name(ds)}", anchor="mt", size=16)
    _heatmap_axes(draw, g, hi["layer"].values, hi["head"].values)
    grid_bottom = g.top + g.n_rows * g.cell
    _text(draw, (g.left + g.n_cols * g.cell / 2, grid_bottom + 26), "head", anchor="mt", size=14)
    _vertical_text(canvas, (g.left - 48, g.top + g.n_rows * g.cell // 2), "layer", size=14)
    _colour_bar(canvas, g.bar, lo, top)
    if np.isnan(hi.values).any():
        draw.rectangle([g.bar[0], g.bar[3] + 28, g.bar[0] + 12, g.bar[3] + 40], fill=NAN_GREY)
        _text(draw, (g.bar[0] + 16, g.bar[3] + 34), "NaN", anchor="lm", size=12)
    return _save(canvas, out)


# ---------------------------------------------------------------- layers
def plot_layers(ds: xr.Dataset, out: str | Path, *, variable: str = "head_impact") -> Path:
    """Mean HI per layer (over heads) with a shaded +/- standard-error band and the
    least-squares line dashed, against layer index (the paper's Fig. 5, top).

    >>> plot_layers(open_store("stores/toy.zarr"), "layers.png")  # doctest: +SKIP
    """
    summary = layer_summary(ds, variable)
    layers, mean = summary["layer"].values.astype(float), summary["mean"].values
    se = np.nan_to_num(summary["se"].values)  # a layer with one head gets no band
    ok = np.isfinite(mean)
    slope, intercept = summary.attrs["slope"], summary.attrs["intercept"]
    fit = intercept + slope * layers
    y_values = np.concatenate([(mean - se)[ok], (mean + se)[ok], fit[np.isfinite(fit)]])
    canvas, box = _line_canvas(f"mean {variable} per layer - {_model_name(ds)}")
    axes = _Axes(box, _layer_ticks(layers), nice_ticks(float(y_values.min()), float(y_values.max()), 6))
    axes.draw(
        canvas, x_label="layer", y_label=f"mean {variable} over heads (+/- SE)", x_format=lambda x: f"{x:g}"
    )
    draw = ImageDraw.Draw(canvas)
    upper = [axes.px(x, y) for x, y in zip(layers[ok], (mean + se)[ok])]
    lower = [axes.px(x, y) for x, y in zip(layers[ok], (mean - se)[ok])]
    if len(upper) > 1:
        draw.polygon(upper + lower[::-1], fill=BAND)
    colour = PALETTE[0]
    if np.isfinite(slope):
        _dashed(draw, axes.px(layers[0], fit[0]), axes.px(layers[-1], fit[-1]), fill=(60, 60, 60))
    _series(draw, [axes.px(x, y) for x, y in zip(layers[ok], mean[ok])], colour)
    draw.rectangle(box, outline="black")
    _legend(
        canvas,
        (box[0] + 12, box[1] + 14),
        [
            (f"mean {variable}", colour, "line"),
            ("+/- standard error over heads", BAND, "band"),
            (f"least squares: slope {slope:+.4f} per layer", (60, 60, 60), "dashed"),
        ],
    )
    return _save(canvas, out)


def _layer_ticks(layers: np.ndarray) -> list[float]:
    """Integer ticks over the layer range, at most about 12 of them."""
    lo, hi = float(layers.min()), float(layers.max())
    if hi == lo:
        return [lo - 1, lo, lo + 1]
    step = max(1, math.ceil((hi - lo) / 12))
    return [float(v) for v in np.arange(lo, hi + step / 2, step)]


# ---------------------------------------------------------------- compare
def plot_compare(datasets: Sequence[xr.Dataset], out: str | Path, *, variable: str = "head_impact") -> Path:
    """Mean HI per layer against relative depth (layer / (n_layers - 1)), one line per
    store, labelled by its ``model`` attribute, so models of different depth line up.

    >>> plot_compare([open_store("a.zarr"), open_store("b.zarr")], "compare.png")  # doctest: +SKIP
    """
    if not datasets:
        raise PlotError("plot_compare: no stores given")
    summaries = []
    for i, ds in enumerate(datasets):
        if "depth" not in ds.coords:
            raise PlotError(f"plot_compare: store {i} ({_model_name(ds)}) has no 'depth' coordinate")
        summaries.append(layer_summary(ds, variable))
    means = np.concatenate([s["mean"].values[np.isfinite(s["mean"].values)] for s in summaries])
    labels = unique_labels([_model_name(ds) for ds in datasets])
    labels = [f"{label} ({s.sizes['layer']} layers)" for label, s in zip(labels, summaries)]
    legend_width = 90 + int(max(_font(13).getlength(label) for label in labels))  # swatch + text + margins
    canvas, box = _line_canvas(f"mean {variable} per layer against depth", legend_width=legend_width)
    axes = _Axes(box, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], nice_ticks(float(means.min()), float(means.max()), 6))
    axes.draw(canvas, x_label="relative depth  layer / (n_layers - 1)", y_label=f"mean {variable} over heads")
    draw = ImageDraw.Draw(canvas)
    entries = []
    for k, (summary, label) in enumerate(zip(summaries, labels)):
        colour = PALETTE[k % len(PALETTE)]
        ok = np.isfinite(summary["mean"].values)
        depth, mean = summary["depth"].values[ok], summary["mean"].values[ok]
        _series(draw, [axes.px(x, y) for x, y in zip(depth, mean)], colour)
        entries.append((label, colour, "line"))
    _legend(canvas, (box[2] + 45, box[1] + 10), entries)
    return _save(canvas, out)


# ---------------------------------------------------------------- overlay
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
    from probes.head_impact import (  # probes sit above mechhi
        BinarizeRule,
        binarize_attention,
        binarize_mask,
        iou,
    )

    if "attention" not in ds.data_vars:
        raise PlotError("store has no attention maps (it was traced with --no-maps)")
    for dim, value in (("sample", sample), ("layer", layer), ("head", head)):
        if value not in ds[dim].values:
            raise PlotError(
                f"{dim} {value} is not in the store ({dim}s {int(ds[dim].min())}..{int(ds[dim].max())})"
            )
    if "done" in ds.data_vars and not bool(ds["done"].sel(sample=sample)):
        raise PlotError(f"sample {sample} has not been traced yet (done is False)")
    grids = [_own_grid(ds, view, sample, layer, head) for view in store_views(ds)]  # main view first
    att = np.concatenate([a.ravel() for a, _ in grids])  # (V,) every view, as the probe pools them
    cov = np.concatenate([c.ravel() for _, c in grids])  # (V,)
    rule = ds.attrs.get("binarize")
    rule = BinarizeRule.from_dict(rule) if isinstance(rule, dict) else BinarizeRule()
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


def _sample_image(ds: xr.Dataset, sample: int) -> Image.Image:
    """The sample's image, found through the dataset path recorded in the store."""
    ref = str(ds.attrs.get("dataset") or "")
    path, sep, fingerprint = ref.rpartition("#")
    path = path if sep else ref
    image_id, object_id = (str(ds[c].sel(sample=sample).values) for c in ("image_id", "object_id"))
    hint = "pass the image explicitly (image=...)"
    if not path:
        raise PlotError(f"store records no dataset path; {hint}")
    try:
        data = load_dataset(path, check_images=False, skip_bad=True)
    except DatasetError as err:
        raise PlotError(f"cannot open the store's dataset {path}: {err}; {hint}") from None
    match = next((s for s in data.samples if s.image_id == image_id and s.object_id == object_id), None)
    if match is None:
        raise PlotError(
            f"dataset {path} has no image {image_id!r} object {object_id!r} (sample {sample}); {hint}"
        )
    if fingerprint and data.fingerprint != fingerprint:
        warnings.warn(
            f"dataset {path} changed since the store was traced (fingerprint differs)", stacklevel=3
        )
    try:
        return match.image()
    except (DatasetError, OSError) as err:
        raise PlotError(f"cannot load the image of sample {sample}: {err}; {hint}") from None


def _cells_to_image(cells: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (rows, cols[, 3]) token grid stretched over an image of `size` (w, h), each token
    a block of pixels: -> (h, w[, 3]) float. The grid is taken to cover the whole image."""
    rows, cols = cells.shape[:2]
    w, h = size
    r = np.minimum(np.arange(h) * rows // h, rows - 1)  # (h,) token row of each pixel row
    c = np.minimum(np.arange(w) * cols // w, cols - 1)  # (w,)
    return np.asarray(cells, dtype=np.float64)[r[:, None], c[None, :]]


def overlay_panels(maps: OverlayMaps, image: Image.Image, *, tile: int = 256) -> list[Image.Image]:
    """Three pictures whose longer side is `tile` px: attention heat on the (grey) image, the
    binarised attention tinted orange, the binarised token mask tinted magenta."""
    scale = tile / max(image.size)  # small images are enlarged too, so panels stay readable
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    picture = image.convert("L").convert("RGB").resize(size, Image.BILINEAR)
    base = np.asarray(picture, dtype=np.float64)  # (h, w, 3)
    heat = colormap(_scale(maps.attention, *_range(maps.attention)))  # (rows, cols, 3)
    panels = [0.35 * base + 0.65 * _cells_to_image(heat, picture.size)]
    for cells, tint in ((maps.attention_bin, ATTENTION_TINT), (maps.mask_bin, MASK_TINT)):
        inside = _cells_to_image(cells.astype(np.float64), picture.size)[..., None] > 0.5  # (h, w, 1)
        dimmed = 0.6 * base + 0.4 * 255.0  # washed out, so the tinted tokens stand out
        panels.append(np.where(inside, 0.45 * base + 0.55 * tint, dimmed))
    return [Image.fromarray(np.clip(np.rint(p), 0, 255).astype(np.uint8)) for p in panels]


def plot_overlay(
    ds: xr.Dataset,
    out: str | Path,
    *,
    sample: int,
    layer: int,
    head: int,
    image: Image.Image | None = None,
    tile: int = 256,
) -> Path:
    """One sample's attention map of head (layer, head) on its image, beside the binarised
    attention and the binarised token mask, whose IoU is in the title.

    The token grid is stretched over the whole image: right for adapters that resize the
    image to the grid, approximate for ones that pad or crop. Without `image`, the image
    is loaded from the dataset path recorded in the store (``attrs["dataset"]``).

    >>> plot_overlay(open_store("stores/toy.zarr"), "o.png", sample=0, layer=5, head=2)  # doctest: +SKIP
    """
    maps = overlay_maps(ds, sample=sample, layer=layer, head=head)
    picture = image if image is not None else _sample_image(ds, sample)
    panels = overlay_panels(maps, picture, tile=tile)
    w, h = panels[0].size
    gap, top = 16, 62
    canvas = Image.new("RGB", (3 * w + 4 * gap, top + h + 40), "white")
    draw = ImageDraw.Draw(canvas)
    description = str(ds["description"].sel(sample=sample).values)
    _text(draw, (canvas.width / 2, 10), f'sample {sample}: "{description[:70]}"', anchor="mt", size=15)
    rule = ds.attrs.get("binarize") or {}
    threshold = rule.get("mask_threshold", 0.5) if isinstance(rule, dict) else 0.5
    titles = [
        f"attention, layer {layer} head {head}",
        f"attention > mean  (IoU {maps.iou:.2f})",
        f"token mask (coverage >= {threshold:g})",
    ]
    for k, (panel, title) in enumerate(zip(panels, titles)):
        x = gap + k * (w + gap)
        canvas.paste(panel, (x, top))
        _text(draw, (x + w / 2, top - 8), title, anchor="mb", size=13)
    rows, cols = maps.attention.shape
    _text(
        draw,
        (canvas.width / 2, top + h + 12),
        f"{_model_name(ds)} - token grid {rows}x{cols}",
        anchor="mt",
        size=12,
        fill=(90, 90, 90),
    )
    return _save(canvas, out)
