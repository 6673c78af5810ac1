"""Opening a store lazily, checking that it is a mechhi store this version can read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from .schema import SCHEMA_VERSION, StoreError

# Every store create_store makes has these; a store without them cannot say what is traced.
REQUIRED_VARIABLES = ("done", "mask")


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
    missing = [name for name in REQUIRED_VARIABLES if name not in ds.variables]
    if missing:
        raise StoreError(f"{path} is a damaged mechhi store: it has no {', '.join(map(repr, missing))} variable "
                         "(trace into a new --store)")  # fmt: skip
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

