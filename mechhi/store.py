"""The mechhi store: one zarr v3 group per (model x dataset x prompt template), read and
written through xarray.

Why a store at all: tracing a model over a dataset is the slow part, scoring is cheap.
The tracer writes each batch of samples as a *region* of arrays that were allocated up
front, then flags those samples ``done``; a killed run re-opens the same store and
traces only the samples that are not done. Probes read the store lazily (dask) and
write their results back as new variables.

Dim vocabulary (every mechhi array uses only these names):

``sample``
    one dataset sample (image, object mask, description); int coordinate 0..N-1, with
    ``image_id``, ``object_id``, ``description``, ``grid_rows``, ``grid_cols`` on it.
``layer``
    a decoder layer of the language model; int coordinate, with ``depth`` =
    layer / (n_layers - 1) on it so models of different depth can be compared.
``head``
    a query head of that layer; int coordinate.
``row``, ``col``
    the visual-token grid of the main view ("image"). Grids differ per sample; the
    store's grid is the largest one and cells outside a sample's own grid are NaN.
``row_<view>``, ``col_<view>``
    the grid of another view of the same image (e.g. SmolVLM's global image beside
    its tile mosaic), with ``grid_rows_<view>`` / ``grid_cols_<view>`` on sample.
``model``
    only in :func:`combine`: one entry per store, aligned on ``depth`` (models of
    different depth share equal-width depth bins; ``align="exact"`` or ``"layer"``
    for the other alignments).

Variables: ``attention`` (sample, layer, head, row, col), ``mask`` (sample, row, col),
``attention_<view>`` / ``mask_<view>`` for other views, ``iou`` (sample, layer, head),
``head_impact`` (layer, head, written by probes), ``done`` (sample).

Every per-sample variable is chunked by one sample, so any region write of any batch
(even non-contiguous sample indices after a resume) is chunk-aligned: it touches only
that batch's chunk files and never races with or rewrites another sample's data.
Consolidated metadata is off: region writes never change metadata, and
:func:`write_scores` adds variables, which would leave a consolidated copy stale.

>>> create_store("s.zarr", samples=metas, n_layers=2, n_heads=4, attrs=attrs)  # doctest: +SKIP
>>> write_batch("s.zarr", [0, 1], attention={"image": a}, mask={"image": m})  # doctest: +SKIP
>>> open_store("s.zarr").attention.sel(layer=1)  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

SCHEMA_VERSION = 1
MAIN_VIEW = "image"
# Attributes the caller must give to create_store; `binarize` is optional there (it is
# only known once a probe scores the store, or when tracing with --no-maps).
REQUIRED_ATTRS = ("model", "model_revision", "dtype", "prompt_template", "dataset")
# What must match for create_store to resume an existing store instead of failing.
COMPATIBLE_ATTRS = ("model", "dataset", "prompt_template", "dtype")


class StoreError(ValueError):
    """A store is missing, not a mechhi store, or does not fit the requested write."""


@dataclass(frozen=True)
class SampleMeta:
    """What the store keeps about one sample besides its arrays.

    ``grids`` maps each view name to (rows, cols) of this sample's own token grid; the
    main view is "image" and every sample must have the same set of views.
    """

    image_id: str
    object_id: str
    description: str
    grids: dict[str, tuple[int, int]]


# ---------------------------------------------------------------- naming helpers
def attention_name(view: str) -> str:
    """Variable name of a view's attention maps: ``attention`` or ``attention_<view>``."""
    return "attention" if view == MAIN_VIEW else f"attention_{view}"


def mask_name(view: str) -> str:
    """Variable name of a view's token mask: ``mask`` or ``mask_<view>``."""
    return "mask" if view == MAIN_VIEW else f"mask_{view}"


def grid_dims(view: str) -> tuple[str, str]:
    """(row dim, col dim) of a view: ``row``/``col`` or ``row_<view>``/``col_<view>``."""
    return ("row", "col") if view == MAIN_VIEW else (f"row_{view}", f"col_{view}")


def grid_coords(view: str) -> tuple[str, str]:
    """Per-sample grid-size coords of a view: ``grid_rows``/``grid_cols`` (+ ``_<view>``)."""
    return ("grid_rows", "grid_cols") if view == MAIN_VIEW else (f"grid_rows_{view}", f"grid_cols_{view}")


def store_views(ds: xr.Dataset) -> list[str]:
    """Views present in a store, main view first (read from the ``mask*`` variables)."""
    views = [MAIN_VIEW] if "mask" in ds.data_vars else []
    views += sorted(str(n)[len("mask_"):] for n in ds.data_vars if str(n).startswith("mask_"))
    return views


def pad_grid(array: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """NaN-pad the last two dims of `array` up to (rows, cols).

    The tracer produces each sample at its own grid size; the store holds the largest
    grid, so smaller grids are padded with NaN ("outside this sample's grid").

    >>> pad_grid(np.ones((1, 2)), 2, 3)
    array([[ 1.,  1., nan],
           [nan, nan, nan]])
    """
    array = np.asarray(array)
    if array.ndim < 2 or array.shape[-2] > rows or array.shape[-1] > cols:
        raise StoreError(f"pad_grid: array of shape {array.shape} does not fit into a ({rows}, {cols}) grid")
    out = np.full(array.shape[:-2] + (rows, cols), np.nan, dtype=np.promote_types(array.dtype, np.float32))
    out[..., : array.shape[-2], : array.shape[-1]] = array
    return out


# ---------------------------------------------------------------- attrs
def _mechhi_version() -> str:
    try:
        from importlib.metadata import version

        return version("mechhi")
    except Exception:  # not installed as a distribution (e.g. run from a checkout)
        import mechhi

        return str(getattr(mechhi, "__version__", "0+unknown"))


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for numpy values, paths and objects with ``to_dict``."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def json_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """Attrs as plain JSON values (numpy scalars, paths, tuples converted), so that the
    zarr metadata is readable by any zarr implementation and compares equal after a
    round trip."""
    try:
        return json.loads(json.dumps(dict(attrs), default=json_default))
    except (TypeError, ValueError) as err:
        raise StoreError(f"store attrs are not JSON-serialisable: {err}") from None


def _store_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise StoreError(f"create_store: attrs lack {', '.join(missing)} (required: {', '.join(REQUIRED_ATTRS)})")
    out = {"binarize": None, **attrs}
    out["schema_version"] = SCHEMA_VERSION
    out["mechhi_version"] = _mechhi_version()
    out["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return json_attrs(out)


# ---------------------------------------------------------------- create
def _views_of(samples: Sequence[SampleMeta]) -> list[str]:
    if not samples:
        raise StoreError("create_store: no samples")
    views = set(samples[0].grids)
    if MAIN_VIEW not in views:
        raise StoreError(f"create_store: sample 0 has no '{MAIN_VIEW}' grid (views: {sorted(views)})")
    for i, s in enumerate(samples):
        if set(s.grids) != views:
            raise StoreError(f"create_store: sample {i} has views {sorted(s.grids)}, sample 0 has {sorted(views)}")
    return [MAIN_VIEW] + sorted(views - {MAIN_VIEW})


def _nan(shape: tuple[int, ...], chunks: tuple[int, ...]) -> da.Array:
    # Lazy: to_zarr(compute=False) writes only metadata; unwritten chunks read as NaN.
    return da.full(shape, np.nan, dtype="float32", chunks=chunks)


def _skeleton(samples: Sequence[SampleMeta], n_layers: int, n_heads: int, maps: bool) -> xr.Dataset:
    """The whole store as a lazy dataset: coords filled, data all NaN / False."""
    n, views = len(samples), _views_of(samples)
    coords: dict[str, Any] = {
        "sample": np.arange(n),
        "image_id": ("sample", np.array([s.image_id for s in samples], dtype=object)),
        "object_id": ("sample", np.array([s.object_id for s in samples], dtype=object)),
        "description": ("sample", np.array([s.description for s in samples], dtype=object)),
        "layer": np.arange(n_layers),
        "head": np.arange(n_heads),
        "depth": ("layer", relative_depth(n_layers)),
    }
    data: dict[str, Any] = {}
    for view in views:
        sizes = np.array([s.grids[view] for s in samples], dtype=np.int64)  # (sample, 2)
        if (sizes < 1).any():
            raise StoreError(f"create_store: view '{view}' has an empty grid in sample {int(np.argmin(sizes.min(1)))}")
        rows, cols = (int(x) for x in sizes.max(0))
        rdim, cdim = grid_dims(view)
        rname, cname = grid_coords(view)
        coords.update({rdim: np.arange(rows), cdim: np.arange(cols)})
        coords.update({rname: ("sample", sizes[:, 0]), cname: ("sample", sizes[:, 1])})
        data[mask_name(view)] = (("sample", rdim, cdim), _nan((n, rows, cols), (1, rows, cols)))
        if maps:
            shape = (n, n_layers, n_heads, rows, cols)
            data[attention_name(view)] = (("sample", "layer", "head", rdim, cdim), _nan(shape, (1,) + shape[1:]))
    data["iou"] = (("sample", "layer", "head"), _nan((n, n_layers, n_heads), (1, n_layers, n_heads)))
    data["done"] = (("sample",), da.zeros(n, dtype=bool, chunks=1))
    return xr.Dataset(data, coords=coords)


def create_store(
    path: str | Path,
    *,
    samples: Sequence[SampleMeta],
    n_layers: int,
    n_heads: int,
    attrs: dict[str, Any],
    maps: bool = True,
) -> None:
    """Create the store with every variable allocated (NaN) and ``done`` False.

    If `path` already exists and was made for the same model, dataset, prompt template,
    dtype, n_layers, n_heads, sample descriptions (and with/without maps), it is kept
    untouched: this is how a killed run resumes. Otherwise a StoreError names what differs.
    ``maps=False`` allocates no attention variables (``mechhi trace --no-maps``).
    """
    path = Path(path)
    if n_layers < 1 or n_heads < 1:
        raise StoreError(f"create_store: n_layers={n_layers}, n_heads={n_heads} must be >= 1")
    full_attrs = _store_attrs(attrs)
    skeleton = _skeleton(samples, n_layers, n_heads, maps)
    if path.exists():
        _check_compatible(path, skeleton, full_attrs)
        return
    skeleton.attrs = full_attrs
    # Build beside the target and rename: a kill during creation leaves no half store.
    staging = path.with_name(f".{path.name}.creating")
    if staging.exists():
        shutil.rmtree(staging)
    skeleton.to_zarr(staging, mode="w-", zarr_format=3, consolidated=False, compute=False)
    os.replace(staging, path)


def _check_compatible(path: Path, wanted: xr.Dataset, attrs: dict[str, Any]) -> None:
    have = open_store(path)
    diffs = [
        f"{key}: store has {have.attrs.get(key)!r}, wanted {attrs[key]!r}"
        for key in COMPATIBLE_ATTRS
        if json_attrs({key: have.attrs.get(key)}) != json_attrs({key: attrs[key]})
    ]
    for dim, size in wanted.sizes.items():
        if have.sizes.get(dim) != size:
            label = f"n_{dim}s" if dim in ("layer", "head", "sample") else f"grid dim '{dim}'"
            diffs.append(f"{label}: store has {have.sizes.get(dim)}, wanted {size}")
    if have.sizes.get("sample") == wanted.sizes["sample"]:
        bad = np.flatnonzero(have["description"].values.astype(str) != wanted["description"].values.astype(str))
        if bad.size:
            diffs.append(f"description of sample {int(bad[0])} differs ({bad.size} samples differ)")
    have_vars, wanted_vars = sorted(map(str, have.data_vars)), sorted(map(str, wanted.data_vars))
    if have_vars != wanted_vars:
        diffs.append(f"variables: store has {have_vars}, wanted {wanted_vars} (traced with/without maps?)")
    if diffs:
        raise StoreError(f"store {path} exists for a different run: " + "; ".join(diffs))


# ---------------------------------------------------------------- read
def open_store(path: str | Path) -> xr.Dataset:
    """Open a store lazily (dask-backed), checking it is a mechhi store we can read.

    >>> ds = open_store("stores/toy.zarr")  # doctest: +SKIP
    >>> ds.head_impact.mean("head")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"no store at {path}")
    try:
        ds = xr.open_zarr(path, consolidated=False, zarr_format=3)
    except Exception as err:  # zarr raises several types for "not a group"
        raise StoreError(f"{path} is not a zarr v3 store: {type(err).__name__}: {err}") from None
    version = ds.attrs.get("schema_version")
    if not isinstance(version, int):
        raise StoreError(f"{path} is not a mechhi store (no schema_version attribute)")
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path} has schema_version {version}; this mechhi reads up to {SCHEMA_VERSION}: upgrade mechhi")
    return _plain_strings(ds)


def _plain_strings(ds: xr.Dataset) -> xr.Dataset:
    """zarr v3 strings load as numpy's StringDType, which many tools (and ``astype(str)``)
    refuse; the string coords are small, so load them as ordinary ``<U`` arrays."""
    fixed = {
        name: (coord.dims, np.array(coord.values.tolist(), dtype=str))
        for name, coord in ds.coords.items()
        if coord.dtype.kind == "T"
    }
    return ds.assign_coords(fixed) if fixed else ds


def done_mask(path: str | Path) -> np.ndarray:
    """bool (sample,): which samples have been fully written."""
    return open_store(path)["done"].values.astype(bool)


# ---------------------------------------------------------------- write
def _runs(indices: np.ndarray) -> list[tuple[int, int]]:
    """Half-open [start, stop) positions into sorted `indices` of each contiguous run."""
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    edges = np.concatenate([[0], breaks, [len(indices)]])
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _region_write(path: Path, indices: np.ndarray, arrays: dict[str, tuple[tuple[str, ...], np.ndarray]]) -> None:
    """Write arrays (first dim = sample, ordered like sorted `indices`) one contiguous run
    at a time; each run is a chunk-aligned region, so only those samples' chunks change."""
    for a, b in _runs(indices):
        part = xr.Dataset({name: (dims, arr[a:b]) for name, (dims, arr) in arrays.items()})
        region = {"sample": slice(int(indices[a]), int(indices[b - 1]) + 1)}
        part.to_zarr(path, region=region, mode="r+", consolidated=False, zarr_format=3)


def _check_batch_arrays(ds: xr.Dataset, n: int, attention: dict | None, mask: dict) -> dict[str, tuple]:
    """Validate the batch against the store; return name -> (dims, array)."""
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
                raise StoreError(f"write_batch: {name} has shape {array.shape}, store wants {want} {dims} (use pad_grid)")
            out[name] = (dims, array)
    return out


def write_batch(
    path: str | Path,
    samples: Sequence[int],
    *,
    attention: dict[str, np.ndarray] | None,
    mask: dict[str, np.ndarray],
    iou: np.ndarray | None = None,
) -> None:
    """Write one batch of samples into their regions, then flag them done.

    attention[view]: (b, L, H, rows, cols), mask[view]: (b, rows, cols), iou: (b, L, H),
    each sample padded with NaN (``pad_grid``) to the store's grid of that view; b
    follows `samples`, which may be in any order and non-contiguous. ``done`` is
    written in a second, separate write, so a kill mid-batch never leaves a sample
    flagged done with missing data.
    """
    path = Path(path)
    ds = open_store(path)
    idx = np.asarray(samples, dtype=np.int64)
    n_total = ds.sizes["sample"]
    if idx.ndim != 1 or idx.size == 0:
        raise StoreError(f"write_batch: samples must be a non-empty list of indices, got {samples!r}")
    if idx.min() < 0 or idx.max() >= n_total or np.unique(idx).size != idx.size:
        raise StoreError(f"write_batch: samples {idx.tolist()} must be distinct indices in 0..{n_total - 1}")
    arrays = _check_batch_arrays(ds, idx.size, attention, mask)
    if iou is not None:
        want = (idx.size, ds.sizes["layer"], ds.sizes["head"])
        if np.shape(iou) != want:
            raise StoreError(f"write_batch: iou has shape {np.shape(iou)}, store wants {want} (sample, layer, head)")
        arrays["iou"] = (("sample", "layer", "head"), np.asarray(iou, dtype="float32"))
    order = np.argsort(idx)
    idx = idx[order]
    arrays = {name: (dims, arr[order]) for name, (dims, arr) in arrays.items()}
    _region_write(path, idx, arrays)
    _region_write(path, idx, {"done": (("sample",), np.ones(idx.size, dtype=bool))})


def write_scores(path: str | Path, scores: xr.Dataset) -> None:
    """Write probe results (e.g. ``iou``, ``head_impact``) into the store, replacing
    variables of the same name, and merge ``scores.attrs`` into the store attrs.

    Results must use the store's own dims; coords they carry must equal the store's.
    """
    path = Path(path)
    store = open_store(path)
    for dim in scores.dims:
        if dim not in store.dims:
            raise StoreError(f"write_scores: dim '{dim}' is not in the store (store dims: {sorted(map(str, store.dims))})")
        if scores.sizes[dim] != store.sizes[dim]:
            raise StoreError(f"write_scores: dim '{dim}' has size {scores.sizes[dim]}, store has {store.sizes[dim]}")
        if dim in scores.coords and dim in store.coords and not np.array_equal(scores[dim].values, store[dim].values):
            raise StoreError(f"write_scores: '{dim}' coordinate differs from the store's")
    protected = {"done"} | {n for n in store.data_vars if str(n).startswith(("attention", "mask"))}
    clash = protected & set(map(str, scores.data_vars))
    if clash:
        raise StoreError(f"write_scores: refusing to overwrite traced variables {sorted(clash)}")
    plain = xr.Dataset({name: (var.dims, np.asarray(var.values)) for name, var in scores.data_vars.items()})
    for name, var in plain.variables.items():
        if name not in store.data_vars and "sample" in var.dims:  # one sample per chunk, as everywhere
            var.encoding["chunks"] = tuple(1 if d == "sample" else plain.sizes[d] for d in var.dims)
    # mode="a" replaces the group attrs with the written dataset's: give it the merged set.
    plain.attrs = {**store.attrs, **json_attrs(dict(scores.attrs))}
    plain.to_zarr(path, mode="a", consolidated=False, zarr_format=3)


# ---------------------------------------------------------------- combine
def unique_labels(names: list[str]) -> list[str]:
    """Make model labels unique: a repeated name gets "#2", "#3", ..."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


ALIGNS = ("depth", "exact", "layer")


def combine(
    paths: Sequence[str | Path],
    variables: Sequence[str] = ("head_impact",),
    *,
    align: str = "depth",
    bins: int | None = None,
) -> xr.Dataset:
    """Stack stores of different models along a new ``model`` dim, lining their layers up.

    Model labels come from each store's ``model`` attr; a repeated one gets "#2", "#3".
    Heads are outer-joined in every mode (a model with fewer heads is NaN on the rest).
    How layers line up is `align`:

    ``"depth"`` (default)
        Compare at the same relative depth layer / (n_layers - 1). Exact depths of
        models with 26, 28 and 24 layers almost never coincide, so unless every store
        has the same layer count (then this is ``"exact"``), [0, 1] is cut into `bins`
        equal bins (default: the largest n_layers, so the deepest model keeps one layer
        per bin). Bin k holds depths in [k/bins, (k+1)/bins), the last also depth 1.
        The ``depth`` dim holds bin centres (k + 0.5) / bins; a model's layers in one
        bin are averaged (NaN values skipped), a bin with none of them is NaN. Coords
        on (model, depth): ``layer_count`` (int, layers averaged) and ``layer`` (float,
        the model's layer if exactly one fell in the bin, NaN if none or several).
        With ``bins <= min(n_layers)`` every model has a layer in every bin.
    ``"exact"``
        Outer join on the exact float depths, for stores of equal depth (others are
        mostly NaN). ``layer`` (model, depth) is float, NaN where a model lacks a depth.
    ``"layer"``
        Outer join on the integer ``layer`` index, for models of one family (e.g. a
        model and its finetune). ``depth`` (model, layer) is NaN where a model lacks it.

    A 4-layer and a 7-layer model (bins=7): the 4-layer model's depths 0, 1/3, 2/3, 1
    fall into bins 0, 2, 4, 6, the 7-layer model fills every bin with one layer.

    >>> both = combine(["qwen.zarr", "smol.zarr"])  # doctest: +SKIP
    >>> both.head_impact.mean("head").plot(hue="model")  # doctest: +SKIP
    >>> combine(["qwen.zarr", "smol.zarr"], bins=8).layer_count  # doctest: +SKIP
    """
    _check_align(align, bins)
    if not paths:
        raise StoreError("combine: no stores given")
    stores = [_scored_part(path, variables) for path in paths]
    labels = unique_labels([str(ds.attrs.get("model", Path(path).name)) for ds, path in zip(stores, paths)])
    attrs: dict[str, Any] = {"stores": [str(p) for p in paths], "align": align}
    if align == "depth" and (bins is not None or not _same_depths(stores)):
        bins = bins if bins is not None else max(ds.sizes["layer"] for ds in stores)
        parts = [_bin_depths(ds, bins) for ds in stores]
        attrs["bins"] = int(bins)
    elif align == "layer":
        parts = [ds.reset_coords("depth") for ds in stores]  # a variable, so it can be NaN-filled
    else:
        parts = [_on_exact_depth(ds) for ds in stores]
        attrs["align"] = "exact"
    out = xr.concat(parts, dim=xr.Variable("model", labels), join="outer", fill_value=np.nan)
    out = out.set_coords([c for c in ("layer", "depth", "layer_count") if c in out.data_vars])
    out.attrs = attrs
    return out


def _check_align(align: str, bins: int | None) -> None:
    if align not in ALIGNS:
        raise StoreError(f"combine: unknown align={align!r} (choose one of {', '.join(map(repr, ALIGNS))})")
    if bins is None:
        return
    if align != "depth":
        raise StoreError(f"combine: bins={bins!r} only applies to align='depth', not align={align!r}")
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise StoreError(f"combine: bins={bins!r} must be a positive int")


def _scored_part(path: str | Path, variables: Sequence[str]) -> xr.Dataset:
    """The requested variables of one store, with only the dim coords and ``depth``."""
    ds = open_store(path)
    missing = [v for v in variables if v not in ds.data_vars]
    if missing:
        raise StoreError(f"combine: store {path} has no {', '.join(missing)} (score it: mechhi rank --store {path})")
    for name in variables:
        if "layer" not in ds[name].dims:
            dims = ds[name].dims
            raise StoreError(f"combine: variable {name!r} of store {path} has no 'layer' dim (dims {dims})")
    part = ds[list(variables)]
    return part.drop_vars([c for c in part.coords if c not in part.dims and c != "depth"])


def _same_depths(stores: list[xr.Dataset]) -> bool:
    first = stores[0]["depth"].values
    return all(np.array_equal(ds["depth"].values, first) for ds in stores[1:])


def _on_exact_depth(part: xr.Dataset) -> xr.Dataset:
    part = part.swap_dims(layer="depth").reset_coords("layer")
    part["layer"] = part["layer"].astype(float)  # float so a missing depth can be NaN
    return part


def relative_depth(n_layers: int) -> np.ndarray:
    """layer / (n_layers - 1): 0 for the first layer, 1 for the last (0 for a one-layer model)."""
    return np.arange(n_layers) / max(n_layers - 1, 1)


def depth_bins(n_layers: int, bins: int) -> np.ndarray:
    """int (layer,): the depth bin of each layer, floor(depth * bins) clipped to bins - 1.

    Integer arithmetic, so a depth on a bin edge (1/3 * 12 = 4) never drops a bin
    through float rounding.

    >>> depth_bins(4, 7)
    array([0, 2, 4, 6])
    """
    layers = np.arange(n_layers)
    return np.minimum(layers * bins // max(n_layers - 1, 1), bins - 1)


def _bin_depths(part: xr.Dataset, bins: int) -> xr.Dataset:
    """Average one store's layers per depth bin: (layer, ...) -> (depth, ...)."""
    n_layers = part.sizes["layer"]
    if not np.array_equal(part["layer"].values, np.arange(n_layers)):
        raise StoreError(f"combine: layer coord {part['layer'].values.tolist()} is not 0..{n_layers - 1}")
    which = depth_bins(n_layers, bins)  # (layer,)
    counts = np.bincount(which, minlength=bins)  # (depth,)
    single = np.full(bins, np.nan)
    alone = counts[which] == 1
    single[which[alone]] = np.flatnonzero(alone)
    grouped = part.drop_vars("depth").assign_coords(bin=("layer", which)).groupby("bin")
    binned = grouped.mean(skipna=True).reindex(bin=np.arange(bins))  # (bin, ...), NaN for empty bins
    binned = binned.rename(bin="depth").assign_coords(depth=(np.arange(bins) + 0.5) / bins)
    return binned.assign(layer=("depth", single), layer_count=("depth", counts))
