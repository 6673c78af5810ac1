"""Figures: pixels read back from the PNGs and checked against values computed here
(cell colours against viridis' published end colours, the brightest attention block
against the cell of the largest score, line extents against depth)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from PIL import Image
from scipy import stats

from mechhi.data.format import DatasetWriter, ImageRecord, KeyObject, load_dataset
from mechhi.plots import (
    PlotError,
    heatmap_geometry,
    layer_summary,
    overlay_maps,
    overlay_panels,
    plot_compare,
    plot_heatmap,
    plot_layers,
    plot_overlay,
)
from mechhi.store import SampleMeta, create_store, open_store, pad_grid, write_batch, write_scores
from probes.head_impact import score_store

nan = np.nan
VIRIDIS_TOP, VIRIDIS_BOTTOM = (253, 231, 37), (68, 1, 84)  # matplotlib's viridis(1.0), viridis(0.0)


def make_store(
    path: Path,
    *,
    n_layers: int,
    n_heads: int,
    grids: list[tuple[int, int]],
    seed: int = 0,
    model: str = "toy/model",
    dataset: str = "/nowhere#0",
    attention=None,
    coverage=None,
    maps: bool = True,
    score: bool = True,
) -> xr.Dataset:
    """A traced (and scored) store; random attention/coverage unless given per sample."""
    rng = np.random.default_rng(seed)
    metas = [SampleMeta(f"img{i}", "0", f"object {i}", {"image": g}) for i, g in enumerate(grids)]
    attrs = {
        "model": model,
        "model_revision": "r0",
        "dtype": "float32",
        "prompt_template": "t",
        "dataset": dataset,
    }
    create_store(path, samples=metas, n_layers=n_layers, n_heads=n_heads, attrs=attrs, maps=maps)
    rows, cols = max(g[0] for g in grids), max(g[1] for g in grids)
    att = attention or [rng.random((n_layers, n_heads) + g) for g in grids]
    cov = coverage or [rng.random(g) for g in grids]
    write_batch(
        path,
        list(range(len(grids))),
        attention={"image": np.stack([pad_grid(a, rows, cols) for a in att])} if maps else None,
        mask={"image": np.stack([pad_grid(c, rows, cols) for c in cov])},
        iou=None if maps else rng.random((len(grids), n_layers, n_heads)),
    )
    if score:
        score_store(path)
    return open_store(path)


def load_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        assert 300 <= im.width <= 2000 and 200 <= im.height <= 1500, im.size
        return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------- heatmap
def test_heatmap_cells_match_colour_bar(tmp_path):
    L, H = 5, 3  # not square: a transposed grid would put the cells elsewhere
    store = tmp_path / "s.zarr"
    make_store(store, n_layers=L, n_heads=H, grids=[(2, 2), (2, 3)])
    values = np.array(
        [[0.2, 0.3, 0.25], [0.1, 0.9, nan], [0.4, 0.35, 0.3], [0.5, 0.45, 0.6], [0.3, 0.2, 0.15]]
    )
    write_scores(store, xr.Dataset({"head_impact": (("layer", "head"), values)}))
    png = plot_heatmap(open_store(store), tmp_path / "hi.png")
    pixels = load_png(png)

    g = heatmap_geometry(L, H)

    def cell(row, col):
        x0, y0, x1, y1 = g.cell_box(row, col)
        block = pixels[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1].reshape(-1, 3)
        assert (block == block[0]).all(), f"cell ({row}, {col}) is not one flat colour"
        return tuple(int(v) for v in block[0])

    bar_left, bar_top, bar_right, bar_bottom = g.bar
    bar_x = (bar_left + bar_right) // 2
    assert tuple(pixels[bar_top, bar_x]) == VIRIDIS_TOP
    assert tuple(pixels[bar_bottom - 1, bar_x]) == VIRIDIS_BOTTOM
    assert cell(1, 1) == VIRIDIS_TOP  # the largest HI (0.9)
    assert cell(1, 0) == VIRIDIS_BOTTOM  # the smallest (0.1)
    r, g_, b = cell(1, 2)  # the NaN head
    assert r == g_ == b and 100 < r < 220
    # 0.5 sits at (0.5 - 0.1) / 0.8 = 1/2 of the scale: the bar's colour half-way down.
    mid = pixels[bar_top + round((bar_bottom - 1 - bar_top) * 0.5), bar_x]
    assert np.abs(np.array(cell(3, 0), int) - mid.astype(int)).max() <= 3


def test_heatmap_needs_scores(tmp_path):
    ds = make_store(tmp_path / "s.zarr", n_layers=2, n_heads=2, grids=[(2, 2)], score=False)
    with pytest.raises(PlotError, match="no 'head_impact'"):
        plot_heatmap(ds, tmp_path / "x.png")


# ---------------------------------------------------------------- layers
def test_layer_summary_and_plot(tmp_path):
    store = tmp_path / "s.zarr"
    ds = make_store(store, n_layers=4, n_heads=3, grids=[(2, 3), (3, 3), (2, 2)])
    hi = ds["head_impact"].transpose("layer", "head").values
    got = layer_summary(ds)
    for layer in range(4):
        heads = [v for v in hi[layer] if not np.isnan(v)]
        assert got["mean"].values[layer] == pytest.approx(sum(heads) / len(heads))
        assert got["se"].values[layer] == pytest.approx(stats.sem(heads))
    ref = stats.linregress(np.arange(4), got["mean"].values)
    assert got.attrs["slope"] == pytest.approx(ref.slope)
    assert got.attrs["intercept"] == pytest.approx(ref.intercept)
    pixels = load_png(plot_layers(ds, tmp_path / "layers.png"))
    band = np.all(pixels == (205, 222, 240), axis=-1).sum()
    assert band > 500  # the SE band is drawn as an area, not only a legend swatch


# ---------------------------------------------------------------- overlay
OWN, BIG = (3, 4), (4, 5)  # sample 0's grid and the store's (set by sample 1)


def overlay_store(tmp_path: Path, dataset: str = "/nowhere#0") -> xr.Dataset:
    rng = np.random.default_rng(1)
    att0 = rng.random((2, 3) + OWN) * 0.5  # (L=2, H=3, 3, 4)
    att0[1, 2, 2, 3] = 5.0  # layer 1 head 2: the largest score at token (2, 3)
    att0[1, 2, 0, 0] = 2.0
    cov0 = np.zeros(OWN)
    cov0[0, 0:2] = [0.9, 0.6]
    cov0[1, 1] = 0.4
    return make_store(
        tmp_path / "o.zarr",
        n_layers=2,
        n_heads=3,
        grids=[OWN, BIG],
        dataset=dataset,
        attention=[att0, rng.random((2, 3) + BIG)],
        coverage=[cov0, rng.random(BIG)],
    )


def test_overlay_panels_show_the_right_tokens(tmp_path):
    ds = overlay_store(tmp_path)
    maps = overlay_maps(ds, sample=0, layer=1, head=2)
    assert maps.attention.shape == OWN  # cut to the sample's own grid, not the store's 4x5
    assert maps.iou == pytest.approx(float(ds["iou"].sel(sample=0, layer=1, head=2)))
    black = Image.new("RGB", (200, 150), "black")  # 3x4 tokens of 50 px wide, 50 px high
    heat, att_bin, mask_bin = (np.asarray(p, dtype=float) for p in overlay_panels(maps, black, tile=200))
    assert heat.shape == (150, 200, 3)

    luminance = heat @ [0.299, 0.587, 0.114]
    brightest = np.argwhere(luminance >= luminance.max() - 1)
    assert brightest[:, 0].min() >= 100 and brightest[:, 1].min() >= 150  # inside token (2, 3)
    assert luminance[100:150, 150:200].mean() > luminance[:100].max()

    att = np.asarray(ds["attention"].sel(sample=0, layer=1, head=2).values)[: OWN[0], : OWN[1]]
    chosen = att > att.mean()
    covered = np.zeros(OWN, bool)
    covered[0, 0:2] = True  # coverage >= 0.5
    for r in range(OWN[0]):
        for c in range(OWN[1]):
            y, x = 50 * r + 25, 50 * c + 25
            assert (att_bin[y, x, 0] > att_bin[y, x, 2] + 50) == chosen[r, c], (r, c)  # orange vs grey
            assert (mask_bin[y, x, 2] > mask_bin[y, x, 1] + 50) == covered[r, c], (r, c)  # magenta vs grey


def test_plot_overlay_loads_the_image_from_the_dataset(tmp_path):
    root = tmp_path / "data"
    with DatasetWriter(root) as writer:
        for image_id in ("img0", "img1"):
            mask = np.zeros((48, 64), bool)
            mask[5:20, 5:30] = True
            obj = KeyObject.from_mask("0", "a thing", mask)
            writer.add(ImageRecord(image_id, "", 64, 48, None, (obj,)), Image.new("RGB", (64, 48), "red"))
    fingerprint = load_dataset(root).fingerprint
    ds = overlay_store(tmp_path, dataset=f"{root}#{fingerprint}")
    load_png(plot_overlay(ds, tmp_path / "o.png", sample=0, layer=1, head=2))
    load_png(
        plot_overlay(ds, tmp_path / "o2.png", sample=1, layer=0, head=0, image=Image.new("RGB", (300, 200)))
    )


def test_plot_overlay_errors(tmp_path):
    ds = overlay_store(tmp_path)
    with pytest.raises(PlotError, match="pass the image"):
        plot_overlay(ds, tmp_path / "o.png", sample=0, layer=1, head=2)
    with pytest.raises(PlotError, match="head 7 is not in the store"):
        plot_overlay(ds, tmp_path / "o.png", sample=0, layer=1, head=7, image=Image.new("RGB", (8, 8)))
    no_maps = make_store(tmp_path / "n.zarr", n_layers=2, n_heads=2, grids=[(2, 2)], maps=False)
    with pytest.raises(PlotError, match="--no-maps"):
        plot_overlay(no_maps, tmp_path / "o.png", sample=0, layer=0, head=0, image=Image.new("RGB", (8, 8)))


# ---------------------------------------------------------------- compare
def test_compare_aligns_models_on_depth(tmp_path):
    shallow = make_store(
        tmp_path / "a.zarr", n_layers=3, n_heads=2, grids=[(2, 2), (2, 3)], model="shallow", seed=1
    )
    deep = make_store(
        tmp_path / "b.zarr", n_layers=7, n_heads=2, grids=[(2, 2), (2, 3)], model="deep", seed=2
    )
    pixels = load_png(plot_compare([shallow, deep], tmp_path / "c.png")).astype(int)

    saturated = pixels.max(-1) - pixels.min(-1) > 80  # line colours, not black text or grey grid
    colours, counts = np.unique(pixels[saturated], axis=0, return_counts=True)
    lines = [tuple(c) for c, n in zip(colours, counts) if n >= 300]  # legend swatches are ~80 px
    assert len(lines) == 2, f"expected two line colours, found {lines}"
    # The plot frame's right border: the rightmost long vertical run of black; the legend
    # lies beyond it.
    black_columns = np.flatnonzero((pixels.max(-1) < 40).sum(0) > 200)
    frame_right = black_columns.max()
    extents = []
    for colour in lines:
        xs = np.argwhere(np.all(pixels[:, :frame_right] == colour, axis=-1))[:, 1]
        extents.append((xs.min(), xs.max()))
    # Both run from depth 0 to depth 1: on a layer axis the 3-layer model would stop at a
    # third of the 7-layer one.
    assert extents[0][1] - extents[0][0] > 300
    assert abs(extents[0][0] - extents[1][0]) <= 3
    assert abs(extents[0][1] - extents[1][1]) <= 3


def test_compare_needs_a_store():
    with pytest.raises(PlotError, match="no stores"):
        plot_compare([], "x.png")
