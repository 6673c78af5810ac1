"""The store schema: one zarr v3 group per (model x dataset x prompt template), read and
written through xarray; this module names its dims, variables and attrs.

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
``done`` (sample): these are the traced variables (:func:`is_traced_variable`), the run
itself. Probes add scores such as ``head_impact`` (layer, head) and rewrite ``iou``;
scores record ``scored_samples`` (how many samples were done when they were computed),
so a score of a half-traced store is recognisably stale once more samples are done.

Every per-sample variable is chunked by one sample, so any region write of any batch
(even non-contiguous sample indices after a resume) is chunk-aligned: it changes only
that batch's chunks. Chunks are grouped into shard files along ``sample``
(:mod:`mechhi.store.layout`): a write rewrites its shards' files, so one process writes
a shard at a time (torchrun ranks own whole shards).
Consolidated metadata is off: region writes never change metadata, and
:func:`write_scores` adds variables, which would leave a consolidated copy stale.

>>> create_store("s.zarr", samples=metas, n_layers=2, n_heads=4, attrs=attrs)  # doctest: +SKIP
>>> write_batch("s.zarr", [0, 1], attention={"image": a}, mask={"image": m})  # doctest: +SKIP
>>> open_store("s.zarr").attention.sel(layer=1)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from mechhi.jsonfiles import json_default
from mechhi.version import __version__

SCHEMA_VERSION = 1
MAIN_VIEW = "image"
Head = tuple[int, int]  # one head by its (layer, head) coordinates: what rankings pick and edits change
# Attributes the caller must give to create_store; `binarize` is optional there (it is
# only known once a probe scores the store, or when tracing with --no-maps).
REQUIRED_ATTRS = ("model", "model_revision", "dtype", "prompt_template", "dataset")
# What must match for create_store to resume an existing store instead of failing.
COMPATIBLE_ATTRS = ("model", "model_revision", "dataset", "prompt_template", "dtype")
# What must match as well where the run records it: how the vqa template's options were drawn.
PROMPT_DRAW_ATTRS = ("vqa_seed", "vqa_draw")


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


def is_grid_dim(dim: str) -> bool:
    """Whether a dim is a view's grid axis (``row``, ``col``, ``row_<view>``, ``col_<view>``)."""
    return dim in ("row", "col") or dim.startswith(("row_", "col_"))


def grid_coords(view: str) -> tuple[str, str]:
    """Per-sample grid-size coords of a view: ``grid_rows``/``grid_cols`` (+ ``_<view>``)."""
    return ("grid_rows", "grid_cols") if view == MAIN_VIEW else (f"grid_rows_{view}", f"grid_cols_{view}")


def is_traced_variable(name: str) -> bool:
    """Whether a variable is written by the tracer (``attention*``, ``mask*``, ``iou``,
    ``done``) rather than by a probe. Only traced variables decide whether a store fits a
    run; probes may add any other name (``write_scores`` refuses the traced prefixes)."""
    return name in ("iou", "done") or name.startswith(("attention", "mask"))


def store_views(ds: xr.Dataset) -> list[str]:
    """Views present in a store, main view first (read from the ``mask*`` variables)."""
    views = [MAIN_VIEW] if "mask" in ds.data_vars else []
    views += sorted(str(n)[len("mask_") :] for n in ds.data_vars if str(n).startswith("mask_"))
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
        return __version__


def json_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """Attrs as plain JSON values (numpy scalars, paths, tuples converted), so that the
    zarr metadata is readable by any zarr implementation and compares equal after a
    round trip."""
    try:
        return json.loads(json.dumps(dict(attrs), default=json_default))
    except (TypeError, ValueError) as err:
        raise StoreError(f"store attrs are not JSON-serialisable: {err}") from None


def relative_depth(n_layers: int) -> np.ndarray:
    """layer / (n_layers - 1): 0 for the first layer, 1 for the last (0 for a one-layer model)."""
    return np.arange(n_layers) / max(n_layers - 1, 1)
