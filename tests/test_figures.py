"""Figures: the drawn data checked against the store (the heatmap's cells are the store's
head_impact, the profile lines and bands are scipy's means and standard errors), and
rendered pixels checked against colours computed here (a known attention cell, the
image's own colours, the colour bar's colour of a value)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgb
from matplotlib.contour import ContourSet
from PIL import Image
from scipy import stats

from mechhi import figures
from mechhi.data.format import load_dataset
from mechhi.evaluate.tables import table4 as experiment_table4
from mechhi.figures.overlay import attention_cmap, overlay_maps
from mechhi.figures.style import dataset_name, model_labels, short_name
from mechhi.store import open_store, write_scores
from tests.figure_stores import (
    BACKGROUND,
    OBJECT,
    fake_entries,
    make_dataset,
    make_store,
    object_mask,
    store_with_images,
)

nan = np.nan
DPI = 100


def render(fig, tmp_path: Path, name: str = "f.png") -> np.ndarray:
    """Save at DPI and return the RGB pixels; the figure's transforms then match them."""
    fig.set_dpi(DPI)
    path = figures.save(fig, tmp_path / name, dpi=DPI)
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(int)


def pixel(pixels: np.ndarray, ax, x: float, y: float) -> np.ndarray:
    """The rendered colour at data point (x, y) of `ax`."""
    px, py = ax.transData.transform((x, y))
    return pixels[round(pixels.shape[0] - py), round(px)]


def texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]


# ---------------------------------------------------------------- style and names
@pytest.mark.parametrize(
    "model, expected",
    [
        ("Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-2B-Instruct"),
        ("/home/me/zoo/toy-qwen2vl", "toy-qwen2vl"),
        ("/home/me/zoo/toy-qwen2vl/", "toy-qwen2vl"),
        ("mechhi/zoo/toy-qwen2vl", "toy-qwen2vl"),
        ("./toy", "toy"),
        ("gpt2", "gpt2"),
    ],
)
def test_short_name(model, expected):
    assert short_name({"model": model}) == expected


def test_short_name_falls_back_to_the_store_stem():
    assert short_name({}, "/x/stores/qwen2vl-coco.zarr") == "qwen2vl-coco"
    assert dataset_name({"dataset": "/a/b/toy-trace#123"}) == "toy-trace"


def test_labels_say_what_differs(tmp_path):
    a = make_store(
        tmp_path / "a.zarr", n_layers=2, n_heads=2, grids=[(2, 2)], model="/m/toy", dataset="/d/one#1"
    )
    b = make_store(
        tmp_path / "b.zarr", n_layers=2, n_heads=2, grids=[(2, 2)], model="/n/toy", dataset="/d/two#1"
    )
    c = make_store(
        tmp_path / "c.zarr",
        n_layers=2,
        n_heads=2,
        grids=[(2, 2)],
        model="/m/toy",
        dataset="/d/one#1",
        template="vqa",
    )
    assert model_labels([a, b]) == ["toy (one)", "toy (two)"]
    assert model_labels([a, c]) == ["toy (t)", "toy (vqa)"]
    assert model_labels([a, open_store(tmp_path / "a.zarr")]) == ["toy", "toy"]  # identical: no invented "#2"


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory) -> xr.Dataset:
    """One sample, 3 x 2 heads: for the tests of saving, which only read it."""
    return make_store(tmp_path_factory.mktemp("small") / "s.zarr", n_layers=3, n_heads=2, grids=[(2, 2)])


@pytest.mark.parametrize("ext, magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_saved_by_extension(tmp_path, small_ds, ext, magic):
    ds = small_ds
    path = figures.save(figures.heatmap_figure([ds]), tmp_path / f"hi{ext}")
    assert path.read_bytes().startswith(magic)


def test_dpi_sets_the_png_size(tmp_path, small_ds):
    ds = small_ds
    fig = figures.heatmap_figure([ds])
    width, height = fig.get_size_inches()
    for dpi in (80, 200):
        with Image.open(figures.save(fig, tmp_path / f"{dpi}.png", dpi=dpi)) as im:
            assert im.size == (round(width * dpi), round(height * dpi))


def test_unknown_extension_refused(tmp_path, small_ds):
    ds = small_ds
    with pytest.raises(figures.PlotError, match=r"\.png, \.svg, \.pdf"):
        figures.save(figures.heatmap_figure([ds]), tmp_path / "hi.jpg")


# ---------------------------------------------------------------- heatmap
def test_heatmap_cells_are_the_store_scores(tmp_path):
    L, H = 5, 3  # not square: a transposed grid would show elsewhere
    store = tmp_path / "s.zarr"
    make_store(store, n_layers=L, n_heads=H, grids=[(2, 2), (2, 3)], model="/very/long/abs/path/toy")
    values = np.array(
        [[0.2, 0.3, 0.25], [0.1, 0.9, nan], [0.4, 0.35, 0.3], [0.5, 0.45, 0.6], [0.3, 0.2, 0.15]]
    )
    write_scores(store, xr.Dataset({"head_impact": (("layer", "head"), values)}))
    fig = figures.heatmap_figure([open_store(store)])
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array().filled(nan), values)
    pixels = render(fig, tmp_path)
    viridis = ax.images[0].get_cmap()
    for (i, j), v in np.ndenumerate(values):  # off-centre: the cell's number sits in the middle
        want = np.array(to_rgb("0.85") if np.isnan(v) else viridis((v - 0.1) / 0.8)[:3]) * 255
        assert np.abs(pixel(pixels, ax, j - 0.38, i - 0.38) - want).max() <= 2, (i, j)
    assert fig.axes[1].get_ylabel() == "Head Impact (mean IoU over samples)"  # the colour bar
    words = " ".join(texts(fig))
    assert "toy" in words and "/very" not in words
    assert "2 samples" in words and "attention > mean" in words and "grey: head not scored" in words


def test_heatmap_panels_share_one_scale(tmp_path):
    a = make_store(tmp_path / "a.zarr", n_layers=3, n_heads=2, grids=[(2, 2)], model="a", seed=1)
    b = make_store(tmp_path / "b.zarr", n_layers=6, n_heads=4, grids=[(2, 2)], model="b", seed=2)
    fig = figures.heatmap_figure([a, b])
    both = np.concatenate([a.head_impact.values.ravel(), b.head_impact.values.ravel()])
    for ax, ds in zip(fig.axes[:2], (a, b)):
        image = ax.images[0]
        np.testing.assert_array_equal(image.get_array(), ds.head_impact.transpose("layer", "head").values)
        assert (image.norm.vmin, image.norm.vmax) == (both.min(), both.max())
    assert [ax.get_title() for ax in fig.axes[:2]] == ["a", "b"]
    assert len(fig.axes) == 3  # two panels, one colour bar


def test_heatmap_needs_scores(tmp_path):
    ds = make_store(tmp_path / "s.zarr", n_layers=2, n_heads=2, grids=[(2, 2)], score=False)
    with pytest.raises(figures.PlotError, match="no 'head_impact'"):
        figures.heatmap_figure([ds])


# ---------------------------------------------------------------- profiles (Figure 5)
@pytest.mark.parametrize("along, other", [("layer", "head"), ("head", "layer")])
def test_profile_against_scipy(tmp_path, along, other):
    ds = make_store(tmp_path / "s.zarr", n_layers=4, n_heads=3, grids=[(2, 3), (3, 3), (2, 2)])
    hi = ds.head_impact.transpose(along, other).values
    got = figures.profile(ds, along)
    for k, row in enumerate(hi):
        assert got["mean"].values[k] == pytest.approx(row.mean())
        assert got["se"].values[k] == pytest.approx(stats.sem(row))
    if along == "layer":  # layers are ordered: the line of mean on layer index is scipy's
        fit = stats.linregress(np.arange(len(hi)), hi.mean(1))
        assert (got.attrs["slope"], got.attrs["intercept"]) == (
            pytest.approx(fit.slope),
            pytest.approx(fit.intercept),
        )
    else:  # head indices are nominal: no line across them
        assert "slope" not in got.attrs and "intercept" not in got.attrs


def test_layers_figure_draws_means_bands_and_fit(tmp_path):
    ds = make_store(tmp_path / "s.zarr", n_layers=5, n_heads=3, grids=[(2, 3), (3, 3)])
    fig = figures.layers_figure([ds])
    top, bottom = fig.axes[:2]
    for ax, along in ((top, "layer"), (bottom, "head")):
        summary = figures.profile(ds, along)
        mean, se = summary["mean"].values, summary["se"].values
        line = ax.get_lines()[0]
        np.testing.assert_allclose(line.get_ydata(), mean)
        np.testing.assert_allclose(line.get_xdata(), summary[along].values)
        band = next(c for c in ax.collections if isinstance(c, PolyCollection)).get_paths()[0].vertices
        assert band[:, 1].max() == pytest.approx((mean + se).max())
        assert band[:, 1].min() == pytest.approx((mean - se).min())
    (_, fit) = top.get_lines()
    x = figures.profile(ds, "layer")["layer"].values[[0, -1]]
    layer = figures.profile(ds, "layer")
    np.testing.assert_allclose(fit.get_ydata(), layer.attrs["intercept"] + layer.attrs["slope"] * x)
    assert fit.get_linestyle() == "--" and "slope" in fit.get_label()
    # the head panel: one line (the means), no dashed fit and no slope in the legend
    assert [l.get_linestyle() for l in bottom.get_lines()] == ["-"]
    assert not any("slope" in t.get_text() for t in bottom.get_legend().get_texts())


def test_compare_aligns_models_on_depth(tmp_path):
    shallow = make_store(
        tmp_path / "a.zarr", n_layers=3, n_heads=2, grids=[(2, 2)], model="/x/shallow", seed=1
    )
    deep = make_store(tmp_path / "b.zarr", n_layers=7, n_heads=2, grids=[(2, 2)], model="org/deep", seed=2)
    fig = figures.compare_figure([shallow, deep])
    ax = fig.axes[0]
    lines = [l for l in ax.get_lines() if l.get_marker() == "o"]
    assert [list(l.get_xdata()) for l in lines] == [[0, 0.5, 1], pytest.approx(np.linspace(0, 1, 7))]
    np.testing.assert_allclose(lines[1].get_ydata(), deep.head_impact.mean("head").values)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["shallow (3 layers)", "org/deep (7 layers)"]
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 2  # one SE band each


# ---------------------------------------------------------------- overlay
OWN, BIG = (3, 4), (4, 5)  # sample 0's grid and the store's (set by sample 1)


@pytest.fixture(scope="module")
def overlay_ds(tmp_path_factory) -> xr.Dataset:
    """Two samples of 2 x 3 heads, sample 0 on its own 3x4 grid of the store's 4x5, with a
    known hottest cell; built once per module, since the overlay tests only read it."""
    tmp_path = tmp_path_factory.mktemp("overlay")
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
        attention=[att0, rng.random((2, 3) + BIG)],
        coverage=[cov0, rng.random(BIG)],
    )


def test_overlay_maps_cut_to_the_own_grid(overlay_ds):
    ds = overlay_ds
    maps = overlay_maps(ds, sample=0, layer=1, head=2)
    assert maps.attention.shape == OWN  # the sample's 3x4, not the store's 4x5
    assert maps.iou == pytest.approx(float(ds["iou"].sel(sample=0, layer=1, head=2)))
    att = ds["attention"].sel(sample=0, layer=1, head=2).values[: OWN[0], : OWN[1]]
    np.testing.assert_array_equal(maps.attention_bin, att > att.mean())
    np.testing.assert_array_equal(maps.mask_bin, np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], bool))


def _contour_contains(ax, style_colour: str, points: np.ndarray) -> np.ndarray:
    """Which points lie inside the contour drawn in `style_colour`."""
    contour = next(
        c
        for c in ax.collections
        if isinstance(c, ContourSet) and np.allclose(c.get_edgecolor()[0][:3], to_rgb(style_colour))
    )
    return np.array([any(p.contains_point(pt) for p in contour.get_paths()) for pt in points])


def test_overlay_pixels_and_contours(tmp_path, overlay_ds):
    ds = overlay_ds
    grey = Image.new("RGB", (200, 150), (128, 128, 128))  # 3x4 tokens of 50 px
    mask = np.zeros((150, 200), bool)
    mask[10:40, 10:90] = True
    fig = figures.overlay_figure(ds, sample=0, layer=1, head=2, picture=figures.Picture(grey, mask))
    left, right = fig.axes[:2]
    pixels = render(fig, tmp_path)
    cmap = attention_cmap()
    att = overlay_maps(ds, sample=0, layer=1, head=2).attention
    lowest = np.unravel_index(np.argmin(att), att.shape)
    for value, (r, c) in ((1.0, (2, 3)), (0.0, lowest)):  # the largest score (set above), the smallest
        rgb, alpha = np.array(cmap(value)[:3]) * 255, cmap(value)[3]
        want = alpha * rgb + (1 - alpha) * 128  # the map's colour over the grey image
        assert np.abs(pixel(pixels, right, 50 * c + 20, 50 * r + 20) - want).max() <= 3, (r, c)
    assert (pixel(pixels, left, 150, 120) == 128).all()  # the plain panel: the image's own colour
    centres = np.array([(50 * c + 25, 50 * r + 25) for r in range(3) for c in range(4)])
    chosen = overlay_maps(ds, sample=0, layer=1, head=2).attention_bin.ravel()
    np.testing.assert_array_equal(
        _contour_contains(right, figures.overlay.ATTENTION_BIN_STYLE["colors"], centres), chosen
    )
    np.testing.assert_array_equal(
        _contour_contains(left, figures.overlay.TOKEN_MASK_STYLE["colors"], centres), [1, 1] + [0] * 10
    )
    inside = _contour_contains(left, "white", np.array([(50, 25), (150, 100)]))
    assert list(inside) == [True, False]  # the object's pixel outline
    assert right.get_title() == f"layer 1 head 2: IoU {float(ds.iou.sel(sample=0, layer=1, head=2)):.2f}"
    assert fig.axes[-1].get_ylabel() == figures.overlay.COLOUR_BAR_LABEL  # the colour bar


def _luminance(rgb) -> float:
    """WCAG 2 relative luminance of an sRGB colour (0..255 channels)."""
    c = np.asarray(rgb, dtype=float) / 255
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(c @ [0.2126, 0.7152, 0.0722])


def contrast(a, b) -> float:
    """WCAG 2 contrast ratio of two colours, 1 (same) to 21 (black on white)."""
    low, high = sorted((_luminance(a), _luminance(b)))
    return (high + 0.05) / (low + 0.05)


@pytest.mark.parametrize("name", ["yellow", "orange", "green", "red", "blue", "purple"])
def test_high_attention_stays_visible_over_any_object_colour(tmp_path, overlay_ds, name):
    """The hottest cell, drawn over an image all of one toy colour, must stand out from it
    (WCAG contrast >= 2.5; inferno's yellow hot end over the toy's yellow gave 1.26)."""
    from mechhi.data.synthetic import COLOURS

    ds = overlay_ds
    flat = Image.new("RGB", (200, 150), COLOURS[name])
    fig = figures.overlay_figure(ds, sample=0, layer=1, head=2, picture=figures.Picture(flat, None))
    right = fig.axes[1]
    pixels = render(fig, tmp_path)
    hottest = pixel(pixels, right, 50 * 3 + 20, 50 * 2 + 20)  # token (2, 3) holds the highest score
    assert contrast(hottest, COLOURS[name]) >= 2.5, (name, hottest)


def test_overlay_reads_the_image_from_the_dataset(tmp_path):
    ds = store_with_images(tmp_path, n=3)
    fig = figures.overlay_figure(ds, sample=1, layer=0, head=0)
    pixels = render(fig, tmp_path)
    mask = object_mask(1)
    r, c = np.argwhere(mask).mean(0)  # the object's centre, away from its outline
    assert (pixel(pixels, fig.axes[0], c, r) == OBJECT).all()  # green stays green
    assert (pixel(pixels, fig.axes[0], 60, 60) == BACKGROUND).all()


def test_overlay_errors(tmp_path, overlay_ds):
    ds = overlay_ds
    with pytest.raises(figures.PlotError, match="pass the image"):
        figures.overlay_figure(ds, sample=0, layer=1, head=2)
    with pytest.raises(figures.PlotError, match=r"layer 9 is not in the store \(its layers: 0..1\)"):
        figures.overlay_figure(
            ds, sample=0, layer=9, head=0, picture=figures.Picture(Image.new("RGB", (8, 8)))
        )
    no_maps = make_store(tmp_path / "n.zarr", n_layers=2, n_heads=2, grids=[(2, 2)], maps=False)
    with pytest.raises(figures.PlotError, match="--no-maps"):
        figures.overlay_figure(
            no_maps, sample=0, layer=0, head=0, picture=figures.Picture(Image.new("RGB", (8, 8)))
        )


def test_top_heads_grid_is_the_best_heads(tmp_path):
    ds = store_with_images(tmp_path, n=3, n_layers=4, n_heads=3)
    fig = figures.top_heads_figure(ds, sample=2, n=5)
    hi = ds.head_impact.transpose("layer", "head").values
    order = np.argsort(-hi, axis=None, kind="stable")[:5]
    titles = [ax.get_title() for ax in fig.axes[:5]]
    for title, flat in zip(titles, order):
        layer, head = np.unravel_index(flat, hi.shape)
        iou = float(ds.iou.sel(sample=2, layer=layer, head=head))
        assert title == f"L{layer} H{head}: HI {hi[layer, head]:.2f}, IoU {iou:.2f}"


# ---------------------------------------------------------------- contact sheet
def test_sheet_keeps_the_image_colours(tmp_path):
    data = load_dataset(Path(make_dataset(tmp_path / "d", 3).split("#")[0]))
    fig = figures.sheet_figure(data.samples)
    pixels = render(fig, tmp_path)
    for ax, k in zip(fig.axes, range(3)):
        r, c = np.argwhere(object_mask(k)).mean(0)
        assert (pixel(pixels, ax, c, r) == OBJECT).all()  # no tint on the object
        assert ax.get_title() == "a green square"
        assert any(isinstance(a, ContourSet) for a in ax.collections)


# ---------------------------------------------------------------- results
def test_results_from_the_experiment(tmp_path):
    table4 = experiment_table4(fake_entries())
    (tmp_path / "results.json").write_text(
        json.dumps({"table4": table4, "model": "/a/b/toy", "dataset": "/d/ft"})
    )
    table = figures.load_results(tmp_path)
    assert table.setups == ("original", "top-3", "random-3") and table.baseline == "original"
    fig = figures.results_figure(table)
    for ax, row in zip(fig.axes, table4):
        bars = list(ax.containers)  # errorbar containers, in drawing order
        points = [b for b in bars if b.lines[0] is not None and b.lines[0].get_marker() == "o"]
        for bar, setup in zip(points, table.setups):
            cell = row["cells"][setup]
            assert bar.lines[0].get_ydata()[0] == pytest.approx(cell["mean"])
            segment = bar.lines[2][0].get_segments()[0]
            assert segment[1][1] - segment[0][1] == pytest.approx(2 * cell["se"])
        spread = [b for b in bars if b not in points]
        assert len(spread) == 1  # only random-3 ran several seeds
        segment = spread[0].lines[2][0].get_segments()[0]
        assert segment[1][1] - segment[0][1] == pytest.approx(2 * row["cells"]["random-3"]["spread_sd"])
    assert fig.axes[2].get_yscale() == "linear"  # perplexity, but 2.4 to 2.6 spans too little for a log axis
    assert fig.get_suptitle() == "Fine-tuning by Head Impact: toy on ft"


def test_generic_result_schema_round_trips(tmp_path):
    data = {
        "title": "ablation",
        "baseline": "none",
        "setups": ["none", "top-4 heads"],
        "metrics": [{"name": "acc", "label": "accuracy"}],
        "cells": {
            "acc": {
                "none": {"mean": 0.9, "se": 0.01},
                "top-4 heads": {"mean": 0.5, "se": 0.02, "spread_sd": 0.1, "n_seeds": 3},
            }
        },
    }
    table = figures.ResultTable.from_dict(data)
    assert figures.ResultTable.from_dict(table.to_dict()) == table
    (tmp_path / "r.json").write_text(json.dumps(data))
    assert figures.load_results(tmp_path / "r.json") == table
    logged = {**data, "metrics": [{"name": "acc", "label": "perplexity", "log": True}]}
    logged["cells"] = {"acc": {"none": {"mean": 87.2, "se": 3.2}, "top-4 heads": {"mean": 2.27, "se": 0.06}}}
    assert figures.results_figure(figures.ResultTable.from_dict(logged)).axes[0].get_yscale() == "log"
    with pytest.raises(figures.PlotError, match="not listed in 'setups'"):
        figures.ResultTable.from_dict({**data, "setups": ["none"]})
    with pytest.raises(figures.PlotError, match="finite mean"):
        figures.ResultTable.from_dict({**data, "cells": {"acc": {"none": {"mean": nan, "se": 0.1}}}})
