"""mechhi: which attention heads of a vision-language model look at the key objects.

Trace a VLM on (image, object mask, description) samples, store the description-to-image
attention of every head as labelled xarray cubes in zarr, score heads by Head Impact,
and fine-tune the layers the scores pick.

>>> import mechhi
>>> ds = mechhi.open_store("stores/toy.zarr")              # doctest: +SKIP
>>> ds.head_impact.mean("head").sortby(lambda d: -d)       # doctest: +SKIP
"""

from __future__ import annotations

from mechhi.version import __version__

__all__ = ["__version__", "combine", "open_store"]


def __getattr__(name: str):
    # The store pulls in xarray/zarr/dask; import it only when it is used.
    if name in ("open_store", "combine"):
        from mechhi import store

        return getattr(store, name)
    raise AttributeError(f"module 'mechhi' has no attribute {name!r}")
