"""Stores of several models side by side: a new ``model`` dim, layers aligned on depth."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from mechhi.store.labels import check_labels, model_labels
from mechhi.store.read import open_store
from mechhi.store.schema import StoreError


def unique_labels(names: list[str]) -> list[str]:
    """Make model labels unique: a repeated name gets "#2", "#3", ... (only the same store
    given twice needs it: `model_labels` tells different stores of one model apart)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


ALIGNS = ("depth", "exact", "layer")


def combine(
    paths: Sequence[str | Path] | Mapping[str, str | Path],
    variables: Sequence[str] = ("head_impact",),
    *,
    align: str = "depth",
    bins: int | None = None,
    labels: Sequence[str] | None = None,
) -> xr.Dataset:
    """Stack stores of different models along a new ``model`` dim, lining their layers up.

    The ``model`` coord holds one label per store: the user's, as a mapping
    ``{"smollm2": path_a, "gemma3": path_b}`` or ``labels=[...]`` beside a list (distinct,
    non-empty); else a short readable one (`mechhi.store.labels.model_labels`: the model's
    name, plus the dataset, prompt template or file stem where stores share a model; the
    same store given twice gets "#2"). The figures and the report name stores the same way.
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

    >>> both = combine({"qwen": "qwen.zarr", "smol": "smol.zarr"})  # doctest: +SKIP
    >>> both = combine(["qwen.zarr", "smol.zarr"], labels=["qwen", "smol"])  # doctest: +SKIP
    >>> both.head_impact.mean("head").plot(hue="model")  # doctest: +SKIP
    >>> combine(["qwen.zarr", "smol.zarr"], bins=8).layer_count  # doctest: +SKIP
    """
    _check_align(align, bins)
    if isinstance(paths, Mapping):
        if labels is not None:
            raise StoreError("combine: give labels as the mapping's keys or as labels=, not both")
        labels, paths = list(paths.keys()), list(paths.values())
    if isinstance(paths, (str, Path)):
        raise StoreError(
            f"combine: give a list of stores (or a mapping label -> store), not one path {str(paths)!r}"
        )
    paths = list(paths)
    if not paths:
        raise StoreError("combine: no stores given")
    if labels is not None:
        labels = check_labels(labels, len(paths), "combine: labels")
    stores = [_scored_part(path, variables) for path in paths]
    labels = labels if labels is not None else unique_labels(model_labels(stores, paths))
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
        raise StoreError(
            f"combine: store {path} has no {', '.join(missing)} (score it: mechhi rank --store {path})"
        )
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
