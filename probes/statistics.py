"""Statistics that fit Head Impact's data: every layer and head is measured on the same samples.

The paper's Kruskal-Wallis test (``probes.head_impact.kruskal_wallis``) treats the IoU of
one sample in layer 3 and the IoU of the same sample in layer 7 as independent draws, so
on per-sample IoU its p-value says little (p = 1.4e-89 with 82 samples). Here the images
are the blocks of a repeated-measures design:

- ``friedman``: Friedman's test (scipy.stats.friedmanchisquare) of "the layers differ",
  each block's IoU averaged over a layer's heads; and one test per layer of "its heads
  differ". Kendall's W = chi2 / (n (k - 1)) beside each p-value says how consistently the
  blocks order the groups (0: not at all, 1: every block alike), which a p-value on many
  blocks cannot. ``p_holm`` adjusts the tests' p-values together (``holm``).
- ``bootstrap_layers``: confidence intervals for each layer's mean HI and how often each
  layer is in the top K, over resamples of the data (scipy.stats.bootstrap, BCa).

What is resampled (and what a block is): ``unit="image"`` (the default of both) takes
every sample of an image together, its IoU averaged over the image's objects, since the
descriptions of one image's objects share that image and are not independent;
``unit="sample"`` treats every (image, object) sample as its own unit.

Everything is computed in float64: a store keeps IoU as float32, and scipy returns a
float32 p-value for float32 input, which underflows to 0 below 1e-45.

>>> friedman(score(open_store("stores/toy.zarr")))            # doctest: +SKIP
>>> bootstrap_layers(ds, k=3).top_k_share                     # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import xarray as xr
from scipy import stats

UNITS = ("sample", "image")

# The smallest positive float64: a p-value of 0.0 is a tail below it, never a true zero.
SMALLEST_P = float(np.finfo(np.float64).smallest_subnormal)


def p_text(p: float | None, digits: int = 3) -> str:
    """A p-value as table text: 'n/a' for None or NaN, and '< 5e-324' for a float64 underflow,
    since a p-value of exactly 0 would be a wrong number."""
    if p is None or not np.isfinite(p):
        return "n/a"
    return f"< {SMALLEST_P:.0e}" if p == 0.0 else f"{p:.{digits}g}"


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of tests reported together: the i-th smallest of m p-values
    is multiplied by (m - i), made non-decreasing in that order and capped at 1. It controls
    the chance of any false "differs" among the m tests, with no assumption about how they
    depend on each other (the heads tests share their samples). NaN (a test that could not
    be computed) stays NaN and does not count in m."""
    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(p.shape, np.nan)
    tested = np.flatnonzero(np.isfinite(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    steps = np.maximum.accumulate((len(order) - np.arange(len(order))) * p[order])
    adjusted[order] = np.minimum(steps, 1.0)
    return adjusted


def _per_unit(ds: xr.Dataset, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """IoU sums and counts of finite values per unit -> (U, L, H) each, done samples only."""
    if "iou" not in ds.data_vars:
        raise ValueError("statistics: the dataset has no iou: score it first")
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; choose from {', '.join(UNITS)}")
    iou = ds["iou"].transpose("sample", "layer", "head").values.astype(np.float64)  # (S, L, H)
    keep = np.isfinite(iou).any((1, 2))  # samples never traced or scored are all NaN
    iou = iou[keep]
    if unit == "sample":
        groups = np.arange(len(iou))
    else:
        if "image_id" not in ds.coords:
            raise ValueError("statistics: unit='image' needs the store's image_id coordinate")
        groups = np.unique(ds["image_id"].values[keep], return_inverse=True)[1]
    finite = np.isfinite(iou)
    sums = np.zeros((groups.max() + 1,) + iou.shape[1:])
    counts = np.zeros_like(sums)
    np.add.at(sums, groups, np.where(finite, iou, 0.0))
    np.add.at(counts, groups, finite)
    return sums, counts


def _friedman(blocks: np.ndarray) -> tuple[float, int, float, int, float]:
    """(statistic, df, p, n_blocks, Kendall's W) of a (blocks, groups) array; incomplete blocks dropped."""
    blocks = np.asarray(blocks, dtype=np.float64)  # scipy gives a float32 p for float32 blocks
    blocks = blocks[np.isfinite(blocks).all(1)]
    n, k = blocks.shape
    if n < 2 or k < 3:  # scipy needs three groups
        return np.nan, k - 1, np.nan, n, np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every block tied: scipy returns NaN and warns
        result = stats.friedmanchisquare(*blocks.T)
    statistic = float(result.statistic)
    return statistic, k - 1, float(result.pvalue), n, statistic / (n * (k - 1))


def friedman(ds: xr.Dataset, *, unit: str = "image") -> xr.Dataset:
    """Friedman tests with ``unit`` (images by default, or samples) as blocks, along dim ``test``:
    ``layers`` (a block's IoU averaged over each layer's heads) and ``heads in layer l``
    for every layer. Variables ``statistic``, ``df``, ``p_value``, ``p_holm`` (Holm over
    all these tests), ``n_blocks``, ``kendall_w``.

    Images are the default blocks because the samples of one image share it: with samples
    as blocks an image with five objects counts five times, and the tests take its objects
    for independent repeats (the toy store's W across layers is 0.31 that way, 0.53 by image)."""
    sums, counts = _per_unit(ds, unit)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / counts, np.nan)  # (U, L, H)
        by_layer = np.where(
            np.isfinite(mean).any(2), np.nansum(mean, 2) / np.isfinite(mean).sum(2), np.nan
        )  # (U, L)
    layers = [int(x) for x in ds["layer"].values]
    rows = [_friedman(by_layer)] + [_friedman(mean[:, i, :]) for i in range(len(layers))]
    statistic, df, p_value, n_blocks, w = (np.array(col) for col in zip(*rows))
    return xr.Dataset(
        {
            "statistic": ("test", statistic.astype(float)),
            "df": ("test", df.astype(int)),
            "p_value": ("test", p_value.astype(float)),
            "p_holm": ("test", holm(p_value)),
            "n_blocks": ("test", n_blocks.astype(int)),
            "kendall_w": ("test", w.astype(float)),
        },
        coords={
            "test": ["layers"] + [f"heads in layer {l}" for l in layers],
            "across": ("test", ["layer"] + ["head"] * len(layers)),
            "within_layer": ("test", [np.nan] + [float(l) for l in layers]),
        },
        attrs={"test": "scipy.stats.friedmanchisquare", "blocks": unit, "p_holm": "Holm over these tests"},
    )


# Bytes of resampled (sums, counts) that one vectorised bootstrap call may hold: scipy
# resamples (batch, units, layers x heads) at once, and BCa's jackknife as many again.
_RESAMPLE_BYTES = 256 * 2**20


def _resample_batch(n_units: int, n_values: int) -> int:
    """Resamples per vectorised call so that a large store (1,000 samples x 28 layers x 12
    heads would be 5 GB for 2,000 resamples at once) stays within ``_RESAMPLE_BYTES``."""
    return max(1, _RESAMPLE_BYTES // (2 * 8 * n_units * n_values))


def bootstrap_layers(
    ds: xr.Dataset,
    *,
    k: int = 3,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    unit: str = "image",
    seed: int = 0,
    method: str = "BCa",
) -> xr.Dataset:
    """Each layer's mean HI with a bootstrap confidence interval, and the share of resamples
    that put it among the ``k`` best layers, resampling ``unit`` s (images by default).

    The statistic is the one ``rank`` reports: HI(l, h) = mean IoU over the (resampled)
    samples, NaN skipped, averaged over the layer's heads.
    """
    sums, counts = _per_unit(ds, unit)  # (U, L, H)
    n_units, n_layers, n_heads = sums.shape
    if not 1 <= k <= n_layers:
        raise ValueError(f"bootstrap: k={k} must be between 1 and the number of layers ({n_layers})")
    if n_units < 2:
        raise ValueError(f"bootstrap: {n_units} {unit}(s) with scores; need at least 2")

    def layer_means(s: np.ndarray, c: np.ndarray, axis: int = -1) -> np.ndarray:
        s, c = np.moveaxis(s, axis, -1).sum(-1), np.moveaxis(c, axis, -1).sum(-1)  # (L*H, ...)
        with np.errstate(invalid="ignore", divide="ignore"):
            hi = np.where(c > 0, s / c, np.nan).reshape((n_layers, n_heads) + s.shape[1:])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(hi, axis=1)  # (L, ...)

    flat = (sums.reshape(n_units, -1), counts.reshape(n_units, -1))  # (U, L*H) each
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BCa on a degenerate (constant) layer warns and gives NaN
        result = stats.bootstrap(
            flat,
            layer_means,
            paired=True,
            vectorized=True,
            axis=0,
            n_resamples=n_resamples,
            confidence_level=confidence,
            method=method,
            rng=seed,
            batch=_resample_batch(n_units, flat[0].shape[1]),
        )
    point = layer_means(*flat, axis=0)  # (L,)
    return xr.Dataset(
        {
            "mean_hi": ("layer", point),
            "ci_low": ("layer", result.confidence_interval.low),
            "ci_high": ("layer", result.confidence_interval.high),
            "top_k_share": ("layer", top_k_share(result.bootstrap_distribution, k)),
        },
        coords={
            "layer": ds["layer"].values,
            **({"depth": ("layer", ds["depth"].values)} if "depth" in ds.coords else {}),
        },
        attrs={
            "k": k,
            "n_resamples": n_resamples,
            "confidence": confidence,
            "unit": unit,
            "n_units": n_units,
            "seed": seed,
            "method": f"scipy.stats.bootstrap ({method})",
        },
    )


def top_k_share(distribution: np.ndarray, k: int) -> np.ndarray:
    """(L, B) resampled layer scores -> (L,) share of resamples where the layer is among the
    ``k`` best (NaN ranks last; ties by layer index, as ``rank`` orders them)."""
    order = np.argsort(-np.nan_to_num(distribution, nan=-np.inf), axis=0, kind="stable")  # (L, B)
    inside = np.zeros(distribution.shape, dtype=bool)
    np.put_along_axis(inside, order[:k], True, axis=0)
    return inside.mean(1)


def records(result: xr.Dataset, dim: str) -> list[dict[str, Any]]:
    """One JSON-ready dict per entry of ``dim`` (NaN and infinities -> None: JSON has neither),
    coords included."""

    def plain(value: Any) -> Any:
        value = value.item() if hasattr(value, "item") else value
        return None if isinstance(value, float) and not np.isfinite(value) else value

    names = [*(c for c in result.coords if result[c].dims == (dim,)), *result.data_vars]
    return [{str(name): plain(result[name].values[i]) for name in names} for i in range(result.sizes[dim])]
