"""Opening a store lazily, checking that it is a mechhi store this version can read."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import dask
import numpy as np
import xarray as xr
import zarr

from mechhi.store.schema import SCHEMA_VERSION, StoreError

T = TypeVar("T")

# Every store create_store makes has these; a store without them cannot say what is traced.
REQUIRED_VARIABLES = ("done", "mask")


def open_store(path: str | Path, *, check_done: bool = True) -> xr.Dataset:
    """Open a store lazily (dask-backed), checking it is a mechhi store we can read.

    ``check_done``: also read the ``done`` flags (small), so that a damaged ``done`` file
    is one StoreError naming it and the repair, not a bare checksum error in whichever
    command reads the flags first (`mechhi store verify` opens without it, to repair).

    >>> ds = open_store("stores/toy.zarr")  # doctest: +SKIP
    >>> ds.head_impact.mean("head")  # doctest: +SKIP
    """
    path = Path(path)
    ds = _opened(path, lambda: xr.open_zarr(path, consolidated=False, zarr_format=3))
    _check_mechhi_store(path, ds.attrs, set(map(str, ds.variables)))
    if check_done:
        checked_done_flags(path)
    return _plain_strings(ds)


def _opened(path: Path, open_group: Callable[[], T]) -> T:
    """``open_group()`` of the store at `path`, or a StoreError saying there is none there."""
    if not path.exists():
        raise StoreError(f"no store at {path}")
    try:
        return open_group()
    except Exception as err:  # zarr raises several types for "not a group"
        raise StoreError(f"{path} is not a zarr v3 store: {type(err).__name__}: {err}") from None


def _check_mechhi_store(path: Path, attrs: Mapping[str, Any], names: set[str]) -> None:
    """StoreError unless the group's attrs and variable names are a store this version reads."""
    version = attrs.get("schema_version")
    if not isinstance(version, int):
        raise StoreError(f"{path} is not a mechhi store (no schema_version attribute)")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema_version {version}; this mechhi reads up to {SCHEMA_VERSION}: upgrade mechhi"
        )
    missing = [name for name in REQUIRED_VARIABLES if name not in names]
    if missing:
        raise StoreError(
            f"{path} is a damaged mechhi store: it has no {', '.join(map(repr, missing))} variable "
            "(trace into a new --store)"
        )


def _plain_strings(ds: xr.Dataset) -> xr.Dataset:
    """zarr v3 strings load as numpy's StringDType, which many tools (and ``astype(str)``)
    refuse; the string coords are small, so load them as ordinary ``<U`` arrays."""
    names = [name for name, coord in ds.coords.items() if coord.dtype.kind == "T"]
    if not names:
        return ds
    loaded = dask.compute(*(ds[name].variable.data for name in names))  # one read, not one per coord
    return ds.assign_coords(
        {name: (ds[name].dims, np.array(values.tolist(), dtype=str)) for name, values in zip(names, loaded)}
    )


def done_mask(path: str | Path) -> np.ndarray:
    """bool (sample,): which samples have been fully written (StoreError if the flags are damaged)."""
    path = Path(path)
    # the metadata alone: an xarray open reads every coordinate, several times as long
    group = _opened(path, lambda: zarr.open_group(str(path), mode="r", zarr_format=3))
    names = {name for name, _ in group.members()}
    _check_mechhi_store(path, group.attrs.asdict(), names)
    return checked_done_flags(path)


def checked_done_flags(path: str | Path) -> np.ndarray:
    """The ``done`` flags; a damaged ``done`` file is one StoreError naming it and the repair,
    not a bare checksum error in whichever command reads the flags first."""
    flags, damaged = done_flags(path)
    if damaged:
        key, reason, _ = damaged[0]
        raise StoreError(
            f"{path}: the done flags in {key} are damaged ({reason}): `mechhi store verify --repair "
            f"{path}` marks that file's samples not done, so the next `mechhi trace` traces them again"
        )
    return flags


def done_flags(path: str | Path) -> tuple[np.ndarray, list[tuple[str, str, range]]]:
    """bool (sample,) ``done`` flags that read, and (file, reason, its samples) for each
    ``done`` file that does not decode; its samples read as not done. Why file by file: one
    damaged file must not hide which flags are still good, nor which file to repair."""
    array = zarr.open_array(str(Path(path) / "done"), mode="r", zarr_format=3)
    try:
        return np.asarray(array[:], dtype=bool), []
    except Exception:
        pass
    step = array.metadata.chunk_grid.chunk_shape[0]  # one shard (or chunk) of samples
    flags, damaged = np.zeros(array.shape[0], dtype=bool), []
    for start in range(0, array.shape[0], step):
        try:
            flags[start : start + step] = array[start : start + step]
        except Exception as error:
            key = "done/" + array.metadata.encode_chunk_key((start // step,))
            reason = " ".join(str(error).split()) or type(error).__name__
            damaged.append((key, reason, range(start, min(start + step, array.shape[0]))))
    return flags, damaged
