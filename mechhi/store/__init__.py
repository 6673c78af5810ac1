"""The mechhi store: one zarr v3 group per (model x dataset x prompt template), read and
written through xarray. The dim vocabulary and the variables are defined once, in
:mod:`mechhi.store.schema`.

- ``schema``: names, dims, attrs, ``SampleMeta``, padding;
- ``create``: allocate a store (or keep one of the same run, to resume);
- ``read``: open lazily;
- ``write``: a traced batch as regions, probe scores as variables;
- ``combine``: several models' stores on one depth axis.
"""

from .combine import ALIGNS, combine, depth_bins, unique_labels
from .create import create_store
from .read import done_mask, open_store
from .schema import (
    COMPATIBLE_ATTRS, MAIN_VIEW, REQUIRED_ATTRS, SCHEMA_VERSION, SampleMeta, StoreError, attention_name,
    grid_coords, grid_dims, json_attrs, json_default, mask_name, pad_grid, relative_depth, store_views,
)  # fmt: skip
from .write import write_batch, write_scores

__all__ = [
    "ALIGNS", "COMPATIBLE_ATTRS", "MAIN_VIEW", "REQUIRED_ATTRS", "SCHEMA_VERSION", "SampleMeta", "StoreError",
    "attention_name", "combine", "create_store", "depth_bins", "done_mask", "grid_coords", "grid_dims",
    "json_attrs", "json_default", "mask_name", "open_store", "pad_grid", "relative_depth", "store_views",
    "unique_labels", "write_batch", "write_scores",
]  # fmt: skip
