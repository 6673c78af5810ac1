"""Writing into a store: a batch of traced samples as chunk-aligned regions (then their
``done`` flags), and probe results as new variables."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from mechhi.store.layout import shard_samples, sharded
from mechhi.store.read import open_store
from mechhi.store.schema import (
    MAIN_VIEW,
    StoreError,
    attention_name,
    is_traced_variable,
    json_attrs,
    mask_name,
    store_views,
)


def _runs(indices: np.ndarray) -> list[tuple[int, int]]:
    """Half-open [start, stop) positions into sorted `indices` of each contiguous run."""
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    edges = np.concatenate([[0], breaks, [len(indices)]])
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def _region_write(path: Path, indices: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays (first dim = sample, ordered like sorted `indices`) one contiguous run
    at a time; each run is a region along ``sample``, so only those samples' chunks change.

    Through zarr directly, not ``Dataset.to_zarr(region=...)``: the values are already
    the stored dtype (float32 with NaN, bool), so there is nothing for xarray to encode,
    and its region write re-reads every array's metadata on each call (about 4x the time
    of a small batch's write)."""
    group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    # write_empty_chunks: a done sample's chunk is on disk even if all NaN (an iou with
    # empty unions), so a missing chunk always means lost data (store.verify).
    targets = {name: group[name].with_config({"write_empty_chunks": True}) for name in arrays}
    for a, b in _runs(indices):
        region = slice(int(indices[a]), int(indices[b - 1]) + 1)
        for name, values in arrays.items():
            targets[name][region] = values[a:b]


def _check_batch_arrays(ds: xr.Dataset, n: int, attention: dict | None, mask: dict) -> dict[str, np.ndarray]:
    """Validate the batch against the store; return name -> float32 array."""
    views = store_views(ds)
    has_maps = attention_name(MAIN_VIEW) in ds.data_vars
    if sorted(mask) != sorted(views):
        raise StoreError(f"write_batch: mask views {sorted(mask)} != store views {sorted(views)}")
    if has_maps and (attention is None or sorted(attention) != sorted(views)):
        got = None if attention is None else sorted(attention)
        raise StoreError(f"write_batch: store has attention maps for views {sorted(views)}, got {got}")
    if not has_maps and attention is not None:
        raise StoreError("write_batch: store was created with maps=False, got attention maps")
    out = {}
    for view in views:
        names = [mask_name(view)] + ([attention_name(view)] if has_maps else [])
        for name, array in zip(names, [mask[view]] + ([attention[view]] if has_maps else [])):
            dims = ds[name].dims
            want = (n,) + tuple(ds.sizes[d] for d in dims[1:])
            array = np.asarray(array, dtype="float32")
            if array.shape != want:
                raise StoreError(
                    f"write_batch: {name} has shape {array.shape}, store wants {want} {dims} (use pad_grid)"
                )
            out[name] = array
    return out


def write_batch(
    path: str | Path,
    samples: Sequence[int],
    *,
    attention: dict[str, np.ndarray] | None,
    mask: dict[str, np.ndarray],
    iou: np.ndarray | None = None,
    opened: xr.Dataset | None = None,
) -> None:
    """Write one batch of samples into their regions, then flag them done.

    attention[view]: (b, L, H, rows, cols), mask[view]: (b, rows, cols), iou: (b, L, H),
    each sample padded with NaN (``pad_grid``) to the store's grid of that view (no
    ``iou``: NaN, for a probe to compute); b follows `samples`, which may be in any order
    and non-contiguous. ``done`` is
    written in a second, separate write, so a kill mid-batch never leaves a sample
    flagged done with missing data. ``opened``: the store as `open_store` returned it,
    for a caller that writes many batches (the trace job): the batch is checked against
    its dims and variables, which writes never change, instead of opening the store again
    (about half a small batch's write time).
    """
    path = Path(path)
    ds = opened if opened is not None else open_store(path)
    idx = np.asarray(samples, dtype=np.int64)
    n_total = ds.sizes["sample"]
    if idx.ndim != 1 or idx.size == 0:
        raise StoreError(f"write_batch: samples must be a non-empty list of indices, got {samples!r}")
    if idx.min() < 0 or idx.max() >= n_total or np.unique(idx).size != idx.size:
        raise StoreError(f"write_batch: samples {idx.tolist()} must be distinct indices in 0..{n_total - 1}")
    arrays = _check_batch_arrays(ds, idx.size, attention, mask)
    want = (idx.size, ds.sizes["layer"], ds.sizes["head"])
    if iou is None:  # not computed: NaN, still written, so every traced chunk of a done sample exists
        iou = np.full(want, np.nan)
    if np.shape(iou) != want:
        raise StoreError(
            f"write_batch: iou has shape {np.shape(iou)}, store wants {want} (sample, layer, head)"
        )
    arrays["iou"] = np.asarray(iou, dtype="float32")
    order = np.argsort(idx)
    idx = idx[order]
    _region_write(path, idx, {name: array[order] for name, array in arrays.items()})
    _region_write(path, idx, {"done": np.ones(idx.size, dtype=bool)})


def write_scores(path: str | Path, scores: xr.Dataset, *, opened: xr.Dataset | None = None) -> None:
    """Write probe results (e.g. ``iou``, ``head_impact``) into the store, replacing
    variables of the same name, and merge ``scores.attrs`` into the store attrs.

    Results must use the store's own dims; coords they carry must equal the store's.
    ``opened``: the store as `open_store` returned it, for a caller that just opened it
    to compute the scores (`score_store`), instead of opening it again.
    """
    path = Path(path)
    store = opened if opened is not None else open_store(path)
    for dim in scores.dims:
        if dim not in store.dims:
            raise StoreError(
                f"write_scores: dim '{dim}' is not in the store (store dims: {sorted(map(str, store.dims))})"
            )
        if scores.sizes[dim] != store.sizes[dim]:
            raise StoreError(
                f"write_scores: dim '{dim}' has size {scores.sizes[dim]}, store has {store.sizes[dim]}"
            )
        if (
            dim in scores.coords
            and dim in store.coords
            and not np.array_equal(scores[dim].values, store[dim].values)
        ):
            raise StoreError(f"write_scores: '{dim}' coordinate differs from the store's")
    clash = sorted(str(n) for n in scores.data_vars if is_traced_variable(str(n)) and n != "iou")
    if clash:
        raise StoreError(
            f"write_scores: {clash} are names of traced variables (attention*, mask*, done); "
            "give scores another name"
        )
    plain = xr.Dataset({name: (var.dims, np.asarray(var.values)) for name, var in scores.data_vars.items()})
    new = plain[[name for name in plain.data_vars if name not in store.data_vars]]
    for name, encoding in sharded(new, shard_samples(path)).items():  # sharded like the traced variables
        plain[name].encoding.update(encoding)
    for name, var in new.data_vars.items():
        if "sample" in var.dims[1:]:  # sample not first (no shards): one sample per chunk
            plain[name].encoding["chunks"] = tuple(1 if d == "sample" else plain.sizes[d] for d in var.dims)
    # mode="a" replaces the group attrs with the written dataset's: give it the merged set.
    plain.attrs = {**store.attrs, **json_attrs(dict(scores.attrs))}
    plain.to_zarr(path, mode="a", consolidated=False, zarr_format=3, write_empty_chunks=True)


def unflag(path: str | Path, samples: Sequence[int]) -> None:
    """Mark samples not done (their data was found lost), so the next trace redoes them."""
    idx = np.unique(np.asarray(samples, dtype=np.int64))
    if idx.size:
        _region_write(Path(path), idx, {"done": np.zeros(idx.size, dtype=bool)})
