"""How a store is laid out in files: per-sample variables sharded along ``sample``.

Why: one chunk file per sample per variable makes a store of N samples O(N) files
(357 for 82 samples), which file systems and copies choke on at scale. zarr v3 sharding
puts many samples' chunks into one file while each sample's maps stay their own inner
chunk, so a read of a few samples still decodes only theirs: N samples make O(N / shard)
files. The small per-sample variables are one inner chunk per shard (`per_sample_chunks`).

What it costs: zarr rewrites a whole shard file on every write into it (read, merge,
write; LocalStore writes a temporary file and renames it, so a kill mid-write leaves the
old shard intact). Hence two rules: a shard is kept small in bytes (``SHARD_BYTES``), and
two processes never write one shard (torchrun ranks own whole shards,
``mechhi.trace.distributed``). Stores written before sharding (one chunk per file) read
and resume unchanged: their "shard" is one sample.

Every chunk carries a crc32c checksum (zarr v3's ``crc32c`` codec after zstd, inside each
shard as well as for whole arrays): zstd alone decodes flipped bytes into wrong floats
without a word, while the checksum makes every read of a corrupt chunk fail. The shard
index, which zarr always checksums, says which inner chunks a shard file holds and where:
`stored_chunks` reads it alone, so a verify can find truncated shards and absent inner
chunks without decoding any data. Stores written before checksums read and resume
unchanged (`checksummed` tells them apart).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr
import zarr
from zarr.codecs import Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.core.buffer.cpu import Buffer
from zarr.core.sync import sync

from mechhi.store.schema import SampleMeta, is_grid_dim

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
    grids = [
        max(s.grids[v][0] for s in samples) * max(s.grids[v][1] for s in samples) for v in views
    ]  # cells
    per_sample = 4 * (sum(grids) * (1 + (n_layers * n_heads if maps else 0)) + n_layers * n_heads)
    fits = max(1, SHARD_BYTES // per_sample)
    return int(min(MAX_SHARD_SAMPLES, 2 ** (fits.bit_length() - 1)))  # a power of two: see below


def checksummed_compressors() -> tuple:
    """The compressors of every array mechhi writes: zstd, then a crc32c of the compressed
    bytes, so a flipped or truncated chunk fails to decode instead of reading as numbers."""
    return (ZstdCodec(), Crc32cCodec())


def per_sample_chunks(var: xr.DataArray) -> bool:
    """Whether a per-sample variable keeps one inner chunk per sample: the maps (a
    variable with grid dims: ``attention*``, ``mask*``), which are large and read a few
    samples at a time. The small ones (``done``, ``iou``, per-sample scores) are one inner
    chunk per shard, since they are read whole: every open reads all ``done`` flags and
    ``stats`` reads all ``iou``, and zarr's cost per decoded chunk (about 0.5 ms) made
    per-sample chunks O(N) decodes (5.4 s an open at 10,000 samples; docs/performance.md)."""
    return any(is_grid_dim(str(d)) for d in var.dims[1:])


def sharded(ds: xr.Dataset, shard: int, *, checksum: bool = True) -> dict[str, dict]:
    """to_zarr encoding of `ds`: every per-sample data variable (sample on its first axis)
    in shards of `shard` samples (fewer for a smaller store), the maps in inner chunks of
    one sample and the small variables in one inner chunk per shard (`per_sample_chunks`);
    with ``checksum``, every variable and coordinate's chunks carry a crc32c."""
    out: dict[str, dict] = {}
    for name, var in ds.data_vars.items():
        if var.dims and var.dims[0] == "sample":
            rest = tuple(ds.sizes[d] for d in var.dims[1:])
            outer = min(shard, ds.sizes["sample"])
            inner = 1 if per_sample_chunks(var) else outer
            out[str(name)] = {"chunks": (inner,) + rest, "shards": (outer,) + rest}
    if checksum:
        for name in ds.variables:
            out.setdefault(str(name), {})["compressors"] = checksummed_compressors()
    return out


def checksummed(array: zarr.Array) -> bool:
    """Whether the array's chunks carry a crc32c (stores written before checksums do not)."""
    codecs = array.metadata.codecs
    inner = codecs[0].codecs if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec) else codecs
    return any(isinstance(codec, Crc32cCodec) for codec in inner)


class DamagedShard(ValueError):
    """A shard file whose index cannot be read or points past the file's end."""


def stored_chunks(array: zarr.Array, file: Path) -> np.ndarray | None:
    """bool (inner chunks per shard): which inner chunks the shard `file` of the sharded
    `array` holds, from its index alone (no chunk decoded); None for an unsharded array.

    Why the index: it is crc32c-checked by zarr and lists each inner chunk's byte range,
    so a flipped index, a truncated file (the index is at its end) and an inner chunk that
    is not stored are found by reading a few hundred bytes. Raises `DamagedShard`."""
    codecs = array.metadata.codecs
    if not (len(codecs) == 1 and isinstance(codecs[0], ShardingCodec)):
        return None
    codec: ShardingCodec = codecs[0]
    per_shard = tuple(s // c for s, c in zip(array.metadata.chunk_grid.chunk_shape, codec.chunk_shape))
    index_size = codec._shard_index_size(per_shard)  # zarr's own index layout and codecs (private API)
    size = file.stat().st_size
    if size < index_size:
        raise DamagedShard(f"{size} bytes, shorter than its {index_size}-byte index: truncated")
    with file.open("rb") as handle:
        at_end = codec.index_location.value == "end"
        handle.seek(size - index_size if at_end else 0)
        raw = handle.read(index_size)
    try:
        index = sync(codec._decode_shard_index(Buffer.from_bytes(raw), per_shard))
    except Exception as error:
        raise DamagedShard(f"index unreadable: {' '.join(str(error).split())}") from None
    offsets, lengths = index.offsets_and_lengths[..., 0], index.offsets_and_lengths[..., 1]
    present = offsets != np.iinfo(np.uint64).max
    data_end = size - index_size if at_end else size
    if present.any() and int((offsets[present] + lengths[present]).max()) > data_end:
        raise DamagedShard(
            f"{size} bytes, but its index lists chunks up to byte "
            f"{int((offsets[present] + lengths[present]).max()) + (index_size if at_end else 0)}: "
            "truncated"
        )
    return present


def shard_samples(path: str | Path) -> int:
    """Samples per shard of the store at `path`, read from its ``done`` array's layout
    (1 for a store written before sharding)."""
    return int(
        zarr.open_array(str(Path(path) / "done"), mode="r", zarr_format=3).metadata.chunk_grid.chunk_shape[0]
    )


def shard_index(samples: np.ndarray, shard: int) -> np.ndarray:
    """The shard each sample index lives in."""
    return np.asarray(samples, dtype=np.int64) // shard
