"""The numbers that store figures draw, computed apart from the drawing so tests and the
report can check them: a store's (layer, head) Head Impact, and its profiles (the
paper's Figure 5): the mean over heads per layer, or over layers per head, with the
standard error of that mean, and for layers the least-squares line through it (layers are
ordered by depth; head indices are nominal labels, so a line across them would mean nothing).

NaN heads (never scored) are skipped, as in `probes.head_impact.layer_ranking`.

>>> layer_profile(open_store("stores/toy.zarr")).mean  # doctest: +SKIP
"""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr

from mechhi.figures.style import PlotError


def scores(ds: xr.Dataset, variable: str = "head_impact") -> xr.DataArray:
    """`variable` as a loaded (layer, head) array, refused with a clear message when missing."""
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


def profile(ds: xr.Dataset, along: str = "layer", variable: str = "head_impact") -> xr.Dataset:
    """Per `along` ("layer" or "head"): ``mean`` of `variable` over the other dim, its
    standard error ``se`` (NaN with fewer than two values), ``n``. A layer profile keeps the
    ``depth`` coord and has attrs ``slope`` and ``intercept``: the least-squares line of mean
    on the layer index (NaN with fewer than two finite means). A head profile has no line:
    head indices have no order, so a slope across them is an artefact of the numbering.
    """
    if along not in ("layer", "head"):
        raise PlotError(f"profile along {along!r}: choose layer or head")
    hi = scores(ds, variable)
    other = "head" if along == "layer" else "layer"
    values = hi.transpose(along, other).values  # (along, other)
    n = np.isfinite(values).sum(1)
    with warnings.catch_warnings():  # all-NaN rows and single values give NaN on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, axis=1)
        se = np.where(n > 1, np.nanstd(values, axis=1, ddof=1) / np.sqrt(np.maximum(n, 1)), np.nan)
    coords = {along: hi[along]}
    if along == "layer" and "depth" in hi.coords:
        coords["depth"] = ("layer", np.asarray(hi["depth"].values, dtype=np.float64))
    out = xr.Dataset({"mean": (along, mean), "se": (along, se), "n": (along, n)}, coords=coords)
    out.attrs = {"variable": variable}
    if along == "layer":
        index = hi[along].values.astype(np.float64)
        ok = np.isfinite(mean)
        slope, intercept = np.polyfit(index[ok], mean[ok], 1) if ok.sum() > 1 else (np.nan, np.nan)
        out.attrs.update(slope=float(slope), intercept=float(intercept))
    return out


def layer_profile(ds: xr.Dataset, variable: str = "head_impact") -> xr.Dataset:
    """`profile` along layers: mean over heads (Figure 5, top)."""
    return profile(ds, "layer", variable)


def head_profile(ds: xr.Dataset, variable: str = "head_impact") -> xr.Dataset:
    """`profile` along heads: mean over layers (Figure 5, bottom)."""
    return profile(ds, "head", variable)


def top_heads(ds: xr.Dataset, n: int, variable: str = "head_impact") -> list[tuple[int, int, float]]:
    """The `n` (layer, head, score) of highest `variable`, best first (NaN never chosen;
    ties by layer, then head)."""
    if n < 1:
        raise PlotError(f"top {n}: ask for at least one head")
    hi = scores(ds, variable)
    cells = [
        (int(layer), int(head), float(hi.sel(layer=layer, head=head)))
        for layer in hi["layer"].values
        for head in hi["head"].values
    ]
    ranked = sorted((c for c in cells if np.isfinite(c[2])), key=lambda c: (-c[2], c[0], c[1]))
    return ranked[:n]
