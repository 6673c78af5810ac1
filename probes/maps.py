"""Reading a store's attention maps and object coverage, one sample at a time, for any
probe whose kernel works on one sample's maps.

Kernels see plain numpy: ``attention[view]`` (L, H, rows, cols) and ``coverage[view]``
(rows, cols), NaN outside the sample's grid. The store is read in blocks of samples
of about ``BLOCK_BYTES``, so a large attention cube is never loaded whole.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import xarray as xr

from mechhi.store import attention_name, grid_dims, mask_name, store_views

# Samples' attention maps are read in blocks of about this many bytes.
BLOCK_BYTES = 64 * 2**20

SampleKernel = Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], np.ndarray]


def pool_views(
    attention: dict[str, np.ndarray], coverage: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Flatten and concatenate every view: -> (L, H, V) attention, (V,) coverage.

    Why pool: a model that sees an image twice (tile mosaic + global view) looks at the
    object in either, and a probe should count both."""
    if sorted(attention) != sorted(coverage):
        raise ValueError(f"attention views {sorted(attention)} != coverage views {sorted(coverage)}")
    att, cov = [], []
    for view in sorted(coverage):
        a, c = np.asarray(attention[view]), np.asarray(coverage[view])
        if a.ndim != 4 or a.shape[-2:] != c.shape:
            raise ValueError(f"view '{view}' attention {a.shape} should be (L, H) + coverage grid {c.shape}")
        att.append(a.reshape(a.shape[:2] + (-1,)))  # (L, H, rows*cols)
        cov.append(c.reshape(-1))  # (rows*cols,)
    return np.concatenate(att, axis=-1), np.concatenate(cov)


def labels(ds: xr.Dataset) -> dict[str, Any]:
    """The (sample, layer, head) coordinates of a store, depth included, for labelling results."""
    coords = {d: ds[d].values for d in ("sample", "layer", "head") if d in ds.coords}
    if "depth" in ds.coords:
        coords["depth"] = ("layer", ds["depth"].values)
    return coords


def for_each_sample(ds: xr.Dataset, done: np.ndarray, kernel: SampleKernel, outputs: int = 1) -> np.ndarray:
    """Apply ``kernel`` to every done sample -> (sample, outputs, layer, head), NaN for
    samples not done. ``kernel`` returns (L, H) when ``outputs`` is 1, else (outputs, L, H)."""
    shape = (outputs, ds.sizes["layer"], ds.sizes["head"])
    return map_samples(ds, done, kernel, shape)


def map_samples(ds: xr.Dataset, done: np.ndarray, kernel: SampleKernel, shape: tuple[int, ...]) -> np.ndarray:
    """Apply ``kernel`` to every done sample -> (sample, *shape), NaN for samples not done.

    The general form of `for_each_sample`, for kernels whose result is not per head (a
    grounding's IoU, say)."""
    views = store_views(ds)
    out = np.full((ds.sizes["sample"], *shape), np.nan)
    per_sample = sum(
        ds[attention_name(v)].isel(sample=0).size * ds[attention_name(v)].dtype.itemsize for v in views
    )
    block = max(1, BLOCK_BYTES // max(per_sample, 1))
    todo = np.flatnonzero(done)
    for start in range(0, todo.size, block):
        sel = todo[start : start + block]
        att, cov = _read_block(ds, views, sel)
        for j, s in enumerate(sel):
            try:
                result = kernel({v: att[v][j] for v in views}, {v: cov[v][j] for v in views})
            except ValueError as err:
                raise ValueError(f"sample {int(ds['sample'].values[s])}: {err}") from None
            out[s] = np.reshape(result, shape)
    return out


def _read_block(ds: xr.Dataset, views: list[str], sel: np.ndarray) -> tuple[dict, dict]:
    """Attention (view -> (b, L, H, rows, cols)) and coverage (view -> (b, rows, cols)) of
    samples ``sel``; a chunk that does not decode is named by its sample."""

    def read(part: np.ndarray) -> tuple[dict, dict]:
        att = {
            v: ds[attention_name(v)]
            .isel(sample=part)
            .transpose("sample", "layer", "head", *grid_dims(v))
            .values
            for v in views
        }
        cov = {v: ds[mask_name(v)].isel(sample=part).transpose("sample", *grid_dims(v)).values for v in views}
        return att, cov

    try:
        return read(sel)
    except (RuntimeError, OSError, ValueError):
        for s in sel:  # which sample's chunk is it?
            try:
                read(np.array([s]))
            except (RuntimeError, OSError, ValueError) as err:
                raise ValueError(
                    f"sample {int(ds['sample'].values[s])}: its stored data cannot be read ({err}); "
                    "run `mechhi store verify --deep --repair`, then rerun `mechhi trace`"
                ) from None
        raise


def done_samples(ds: xr.Dataset, probe: str) -> np.ndarray:
    if "done" not in ds.variables:
        raise ValueError(f"{probe}: dataset has no 'done' variable (is it a mechhi store?)")
    return ds["done"].values.astype(bool)


def mean_over(values: xr.DataArray | xr.Dataset, dim: str):
    """Mean along ``dim`` with NaN skipped; all-NaN gives NaN without a warning (it is the answer)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return values.mean(dim, skipna=True)


def sample_summary(values: xr.DataArray) -> xr.Dataset:
    """Per cell, over ``sample`` (NaN skipped): ``mean``, its standard error ``se``
    (sample sd, ddof 1, over sqrt(n); NaN for n < 2) and ``n``, in float64."""
    x = values.astype(np.float64)
    n = x.notnull().sum("sample")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sd = x.std("sample", ddof=1, skipna=True)
    se = (sd / np.sqrt(n)).where(n >= 2)
    return xr.Dataset({"mean": mean_over(x, "sample"), "se": se, "n": n})


def rank_layers(per_layer: xr.DataArray, name: str) -> xr.DataArray:
    """A per-layer score sorted best first (NaN last, ties by layer), keeping the
    ``layer`` dim (so ``.sel(layer=3)`` works) with a ``rank`` coord (1 = best)."""
    per_layer = per_layer.compute()
    order = np.argsort(-per_layer.values, kind="stable")  # NaN sorts last
    ranked = per_layer.isel(layer=order)
    return ranked.assign_coords(rank=("layer", np.arange(1, order.size + 1))).rename(name)


def own_grids(
    attention: dict[str, np.ndarray], coverage: dict[str, np.ndarray]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each view's maps cropped to the sample's own grid: view -> ((L, H, r, c), (r, c)).

    The store pads every sample's grid to the largest one with NaN (bottom and right), so
    the finite cells of the coverage are a top-left rectangle; kernels that look at the
    2-D shape of a map (connected components, boxes) need it without the padding."""
    if sorted(attention) != sorted(coverage):
        raise ValueError(f"attention views {sorted(attention)} != coverage views {sorted(coverage)}")
    out = {}
    for view in sorted(coverage):
        cov = np.asarray(coverage[view])
        finite = np.isfinite(cov)
        rows, cols = int(finite.any(1).sum()), int(finite.any(0).sum())
        if not finite[:rows, :cols].all() or finite.sum() != rows * cols:
            raise ValueError(f"view '{view}': the coverage's finite cells are not a top-left rectangle")
        out[view] = (np.asarray(attention[view])[..., :rows, :cols], cov[:rows, :cols])
    return out
