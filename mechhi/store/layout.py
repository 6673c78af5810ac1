"""How a store is laid out in files: per-sample variables sharded along ``sample``.

Why: one chunk file per sample per variable makes a store of N samples O(N) files
(357 for 82 samples), which file systems and copies choke on at scale. zarr v3 sharding
puts many samples' chunks into one file while each sample stays its own inner chunk, so
a read of a few samples still decodes only theirs: N samples make O(N / shard) files.

What it costs: zarr rewrites a whole shard file on every write into it (read, merge,
write; LocalStore writes a temporary file and renames it, so a kill mid-write leaves the
old shard intact). Hence two rules: a shard is kept small in bytes (``SHARD_BYTES``), and
two processes never write one shard (torchrun ranks own whole shards,
``mechhi.trace.distributed``). Stores written before sharding (one chunk per file) read
and resume unchanged: their "shard" is one sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from .schema import SampleMeta

# A shard is one file holding many samples' chunks. Every region write into it rewrites
# the whole file, so a shard is kept to about this many bytes, and at most this many samples.
SHARD_BYTES = 32 * 2**20
MAX_SHARD_SAMPLES = 256


def auto_shard_samples(samples: Sequence[SampleMeta], n_layers: int, n_heads: int, maps: bool) -> int:
    """Samples per shard: the largest power of two whose shard holds at most ``SHARD_BYTES``
    of traced data (every view's attention and mask, and the iou), between 1 and
    ``MAX_SHARD_SAMPLES``. Why bounded in bytes: a write into a shard rewrites the whole
    shard file. Why a power of two: a shard then holds whole batches of any power-of-two
    ``--batch-size`` up to its size, so ranks, which take whole shards, batch the samples
    as one process does (same padding, same numbers)."""
    views = {v for s in samples for v in s.grids}
    grids = [max(s.grids[v][0] for s in samples) * max(s.grids[v][1] for s in samples) for v in views]  # cells
    per_sample = 4 * (sum(grids) * (1 + (n_layers * n_heads if maps else 0)) + n_layers * n_heads)
    fits = max(1, SHARD_BYTES // per_sample)
    return int(min(MAX_SHARD_SAMPLES, 2 ** (fits.bit_length() - 1)))  # a power of two: see below


def sharded(ds: xr.Dataset, shard: int) -> dict[str, dict[str, tuple[int, ...]]]:
    """to_zarr encoding of every per-sample data variable of `ds` (sample on its first
    axis): inner chunks of one sample, shards of `shard` samples (fewer for a smaller store)."""
    out = {}
    for name, var in ds.data_vars.items():
        if var.dims and var.dims[0] == "sample":
            rest = tuple(ds.sizes[d] for d in var.dims[1:])
            out[str(name)] = {"chunks": (1,) + rest, "shards": (min(shard, ds.sizes["sample"]),) + rest}
    return out


def shard_samples(path: str | Path) -> int:
    """Samples per shard of the store at `path`, read from its ``done`` array's layout
    (1 for a store written before sharding)."""
    return int(zarr.open_array(str(Path(path) / "done"), mode="r", zarr_format=3).metadata.chunk_grid.chunk_shape[0])


def shard_index(samples: np.ndarray, shard: int) -> np.ndarray:
    """The shard each sample index lives in."""
    return np.asarray(samples, dtype=np.int64) // shard
