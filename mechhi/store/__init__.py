"""The mechhi store: one zarr v3 group per (model x dataset x prompt template), read and
written through xarray. The dim vocabulary and the variables are defined once, in
:mod:`mechhi.store.schema`.

- ``schema``: names, dims, attrs, ``SampleMeta``, padding;
- ``create``: allocate a store (or keep one of the same run, to resume);
- ``read``: open lazily;
- ``write``: a traced batch as regions, probe scores as variables;
- ``layout``: per-sample variables sharded along ``sample`` (files per store);
- ``lock``: one writer per store (a lock file naming its holder);
- ``verify``: done samples whose data is lost or corrupt;
- ``combine``: several models' stores on one depth axis.
"""

from mechhi.store.combine import ALIGNS, combine, depth_bins, unique_labels
from mechhi.store.create import create_store
from mechhi.store.layout import auto_shard_samples, shard_index, shard_samples, sharded
from mechhi.store.lock import StoreLocked, WriterLock, lock_path
from mechhi.store.read import done_flags, done_mask, open_store
from mechhi.store.schema import (
    COMPATIBLE_ATTRS,
    MAIN_VIEW,
    REQUIRED_ATTRS,
    SCHEMA_VERSION,
    SampleMeta,
    StoreError,
    attention_name,
    grid_coords,
    grid_dims,
    is_traced_variable,
    json_attrs,
    json_default,
    mask_name,
    pad_grid,
    relative_depth,
    store_views,
)
from mechhi.store.verify import (
    Damage,
    damaged_samples,
    describe,
    explain_read_error,
    missing_data,
    unchecked,
    unflagged,
)
from mechhi.store.write import unflag, write_batch, write_scores

__all__ = [
    "ALIGNS",
    "COMPATIBLE_ATTRS",
    "MAIN_VIEW",
    "REQUIRED_ATTRS",
    "SCHEMA_VERSION",
    "Damage",
    "SampleMeta",
    "StoreError",
    "StoreLocked",
    "WriterLock",
    "attention_name",
    "auto_shard_samples",
    "combine",
    "create_store",
    "damaged_samples",
    "depth_bins",
    "describe",
    "done_flags",
    "done_mask",
    "explain_read_error",
    "grid_coords",
    "grid_dims",
    "is_traced_variable",
    "json_attrs",
    "json_default",
    "lock_path",
    "mask_name",
    "missing_data",
    "open_store",
    "pad_grid",
    "relative_depth",
    "shard_index",
    "shard_samples",
    "sharded",
    "store_views",
    "unchecked",
    "unflag",
    "unflagged",
    "unique_labels",
    "write_batch",
    "write_scores",
]
