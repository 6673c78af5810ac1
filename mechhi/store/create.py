"""Creating a store: every variable allocated up front (NaN, ``done`` False), or an
existing store for the same run kept as it is, which is how a killed run resumes.

Creation is staged under a per-process name and renamed into place, so a kill leaves
no half store and concurrent creators never see each other's half-written copy."""

from __future__ import annotations

import datetime as _dt
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from mechhi.store.dataset_ref import DatasetRef
from mechhi.store.layout import auto_shard_samples, sharded
from mechhi.store.lock import process_alive, this_host
from mechhi.store.read import open_store
from mechhi.store.schema import (
    COMPATIBLE_ATTRS,
    MAIN_VIEW,
    PROMPT_DRAW_ATTRS,
    REQUIRED_ATTRS,
    SCHEMA_VERSION,
    SampleMeta,
    StoreError,
    _mechhi_version,
    attention_name,
    grid_coords,
    grid_dims,
    is_traced_variable,
    json_attrs,
    mask_name,
    relative_depth,
)


def _store_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise StoreError(
            f"create_store: attrs lack {', '.join(missing)} (required: {', '.join(REQUIRED_ATTRS)})"
        )
    out = {"binarize": None, **attrs}
    out["schema_version"] = SCHEMA_VERSION
    out["mechhi_version"] = _mechhi_version()
    out["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return json_attrs(out)


def _views_of(samples: Sequence[SampleMeta]) -> list[str]:
    if not samples:
        raise StoreError("create_store: no samples")
    views = set(samples[0].grids)
    if MAIN_VIEW not in views:
        raise StoreError(f"create_store: sample 0 has no '{MAIN_VIEW}' grid (views: {sorted(views)})")
    for i, s in enumerate(samples):
        if set(s.grids) != views:
            raise StoreError(
                f"create_store: sample {i} has views {sorted(s.grids)}, sample 0 has {sorted(views)}"
            )
    return [MAIN_VIEW] + sorted(views - {MAIN_VIEW})


def _nan(shape: tuple[int, ...], shard: int) -> da.Array:
    # Lazy: to_zarr(compute=False) writes only metadata; unwritten chunks read as NaN.
    return da.full(shape, np.nan, dtype="float32", chunks=(shard,) + shape[1:])


def _skeleton(
    samples: Sequence[SampleMeta], n_layers: int, n_heads: int, maps: bool, shard: int
) -> xr.Dataset:
    """The whole store as a lazy dataset: coords filled, data all NaN / False, each
    per-sample variable's dask chunks one shard (the encoding's `sharded` layout)."""
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
            raise StoreError(
                f"create_store: view '{view}' has an empty grid in sample {int(np.argmin(sizes.min(1)))}"
            )
        rows, cols = (int(x) for x in sizes.max(0))
        rdim, cdim = grid_dims(view)
        rname, cname = grid_coords(view)
        coords.update({rdim: np.arange(rows), cdim: np.arange(cols)})
        coords.update({rname: ("sample", sizes[:, 0]), cname: ("sample", sizes[:, 1])})
        data[mask_name(view)] = (("sample", rdim, cdim), _nan((n, rows, cols), shard))
        if maps:
            shape = (n, n_layers, n_heads, rows, cols)
            data[attention_name(view)] = (("sample", "layer", "head", rdim, cdim), _nan(shape, shard))
    data["iou"] = (("sample", "layer", "head"), _nan((n, n_layers, n_heads), shard))
    data["done"] = (("sample",), da.zeros(n, dtype=bool, chunks=shard))
    return xr.Dataset(data, coords=coords)


def create_store(
    path: str | Path,
    *,
    samples: Sequence[SampleMeta],
    n_layers: int,
    n_heads: int,
    attrs: dict[str, Any],
    maps: bool = True,
    shard_samples: int | None = None,
) -> bool:
    """Create the store with every variable allocated (NaN) and ``done`` False; True if
    this call created it.

    Per-sample variables are sharded along ``sample``: ``shard_samples`` samples per file
    (default `auto_shard_samples`: a power of two, at most ``SHARD_BYTES`` and
    ``MAX_SHARD_SAMPLES``), the maps in one inner chunk per sample and the small
    variables in one per shard (`store.layout.sharded`); the size is recorded in the
    attrs (``shard_samples``). An existing store keeps its own shards.

    If `path` already holds a store made for the same run (model, revision, dataset,
    prompt template, dtype, n_layers, n_heads, sample descriptions, with/without maps),
    it is kept untouched and False returned: this is how a killed run resumes. Scores
    that probes wrote into it (``head_impact``, ...) are not part of the run. Otherwise
    a StoreError names what differs. ``maps=False`` allocates no attention variables
    (``mechhi trace --no-maps``).

    Creation is atomic per process: the store is written under a staging name of this
    process's own and renamed onto `path` in one step. If another process's rename got
    there first, this one drops its copy and checks the winner's store instead, so
    concurrent creators all end with one valid store (or a clear incompatibility).
    """
    path = Path(path)
    if n_layers < 1 or n_heads < 1:
        raise StoreError(f"create_store: n_layers={n_layers}, n_heads={n_heads} must be >= 1")
    _views_of(samples)  # every sample has the same views, before they size the shards
    shard = shard_samples or auto_shard_samples(samples, n_layers, n_heads, maps)
    if shard < 1:
        raise StoreError(f"create_store: shard_samples={shard_samples} must be >= 1")
    full_attrs = _store_attrs({**attrs, "shard_samples": shard})
    skeleton = _skeleton(samples, n_layers, n_heads, maps, shard)
    if _holds_store(path):
        check_compatible(path, skeleton, full_attrs)
        return False
    skeleton.attrs = full_attrs
    _remove_stale_staging(path)
    staging = path.with_name(f"{_staging_prefix(path)}{this_host()}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        skeleton.to_zarr(
            staging,
            mode="w-",
            zarr_format=3,
            consolidated=False,
            compute=False,
            encoding=sharded(skeleton, shard),
        )
        os.rename(staging, path)  # atomic; replaces an empty directory, fails onto a store
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if not _holds_store(path):
            raise StoreError(f"cannot create store {path}: {error}") from None
        check_compatible(path, skeleton, full_attrs)  # another process created it first
        return False
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return True


def _holds_store(path: Path) -> bool:
    """Something is at `path` that is not an empty directory (an empty one is what a
    crashed older version could leave; it is replaced)."""
    if not path.exists():
        return False
    return not path.is_dir() or any(path.iterdir())


def _staging_prefix(path: Path) -> str:
    return f".{path.name}.creating."


def _remove_stale_staging(path: Path) -> None:
    """Remove staging copies left by killed creators: ``.<name>.creating.<host>.<pid>.<token>``
    of a pid that no longer runs on this host, and the single ``.<name>.creating`` of
    mechhi versions before per-process staging."""
    prefix = _staging_prefix(path)
    for candidate in path.parent.glob(f".{path.name}.creating*"):
        if candidate.name == prefix[:-1]:
            shutil.rmtree(candidate, ignore_errors=True)
            continue
        host, _, rest = candidate.name[len(prefix) :].rpartition(".")[0].rpartition(".")
        if host == this_host() and rest.isdigit() and not process_alive(int(rest)):
            shutil.rmtree(candidate, ignore_errors=True)


def _same_attr(key: str, have: Any, wanted: Any) -> bool:
    """Whether a store's attribute fits the run's; a dataset fits by content, named by any path."""
    if key == "dataset":
        return DatasetRef.parse(have).same_content(DatasetRef.parse(wanted))
    return json_attrs({key: have}) == json_attrs({key: wanted})


def check_compatible(path: Path, wanted: xr.Dataset, attrs: dict[str, Any]) -> None:
    """StoreError naming every difference between the store at `path` and the run that
    `wanted` (a skeleton) and `attrs` describe; probe-written variables are ignored."""
    have = open_store(path, check_done=False)  # a damaged done file: the trace repairs it
    diffs = [
        f"{key}: store has {have.attrs.get(key)!r}, wanted {attrs[key]!r}"
        for key in (*COMPATIBLE_ATTRS, *(k for k in PROMPT_DRAW_ATTRS if k in attrs))
        if not _same_attr(key, have.attrs.get(key), attrs[key])
    ]
    for dim, size in wanted.sizes.items():
        if have.sizes.get(dim) != size:
            label = f"n_{dim}s" if dim in ("layer", "head", "sample") else f"grid dim '{dim}'"
            diffs.append(f"{label}: store has {have.sizes.get(dim)}, wanted {size}")
    if have.sizes.get("sample") == wanted.sizes["sample"]:
        bad = np.flatnonzero(
            have["description"].values.astype(str) != wanted["description"].values.astype(str)
        )
        if bad.size:
            diffs.append(f"description of sample {int(bad[0])} differs ({bad.size} samples differ)")
    have_vars = sorted(str(n) for n in have.data_vars if is_traced_variable(str(n)))
    wanted_vars = sorted(map(str, wanted.data_vars))
    if have_vars != wanted_vars:
        diffs.append(
            f"traced variables: store has {have_vars}, wanted {wanted_vars} (traced with/without maps?)"
        )
    if diffs:
        raise StoreError(f"store {path} exists for a different run: " + "; ".join(diffs))
