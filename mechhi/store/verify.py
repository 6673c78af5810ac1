"""Finding done samples whose data is lost or corrupt, so that no probe scores NaN, or
flipped bytes, as if they were data.

Why: zarr reads a chunk that is not on disk as its fill value, and the store's fill
value is NaN, the same NaN that marks cells outside a sample's grid. A deleted chunk of a
done sample therefore reads as a sample the model looked at nowhere, and a rescore fails
much later on "NaN attention score" naming nothing useful. Every traced chunk is written
even when all NaN (``write_empty_chunks``), so for a done sample a missing stored object
(a shard file, or an inner chunk in its shard's index) always means lost data. Every
chunk carries a crc32c (`mechhi.store.layout`), so a flipped byte fails to decode
instead of reading as a wrong number.

Two depths: `missing_data` reads only file sizes, the ``done`` flags and each shard's
index (cheap: run before every scoring and every resume), and so finds deleted shards,
truncated or overwritten shard files, inner chunks absent from their shard and damaged
``done`` files; ``damaged_samples(deep=True)`` also decodes every done sample's chunks
and so finds checksum mismatches (``mechhi store verify --deep``). `repair` makes damaged
samples pending again (deleting a damaged or unreadable file, whose other done samples
are then retraced too); the trace job repairs what `missing_data` finds by itself.

>>> [d.message for d in damaged_samples("stores/toy.zarr")]  # doctest: +SKIP
["sample 3: attention chunk missing (attention/c/1/0/0/0/0)"]
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from mechhi.store.layout import DamagedShard, checksummed, stored_chunks
from mechhi.store.read import done_flags
from mechhi.store.schema import StoreError, is_traced_variable
from mechhi.store.write import unflag

# What a Damage's stored object is: absent (file or inner chunk), damaged (a shard whose
# index does not read or points past its end; found without decoding), unreadable (a
# chunk that does not decode: a checksum mismatch; found by a deep verify).
KINDS = ("missing", "damaged", "unreadable")


@dataclass(frozen=True, order=True)
class Damage:
    """One done sample whose data in one variable is lost."""

    sample: int
    variable: str
    problem: str  # e.g. "chunk missing (attention/c/1/0/0/0/0)"; names the file
    file: str = ""  # the stored object, relative to the store: "attention/c/1/0/0/0/0"
    kind: str = "missing"  # one of KINDS

    @property
    def message(self) -> str:
        return f"sample {self.sample}: {self.variable} {self.problem}"


def traced_per_sample(path: str | Path) -> list[str]:
    """The traced variables that hold per-sample data (everything but ``done``), sorted.
    From the arrays' metadata alone: every open and resume checks the store with this,
    and an xarray open costs several times as much."""
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    return sorted(
        name
        for name, array in group.arrays()
        if is_traced_variable(name) and name != "done" and "sample" in (array.metadata.dimension_names or ())
    )


def missing_data(path: str | Path) -> list[Damage]:
    """Done samples whose stored data is absent or structurally damaged, found without
    decoding any data: a missing file, a shard file whose index does not read (truncated,
    overwritten) or lists bytes past its end, an inner chunk its index does not hold, and
    ``done`` files that do not decode (their samples' flags are unknown)."""
    path = Path(path)
    done, bad_done = done_flags(path)
    found = [
        Damage(sample, "done", f"flag unreadable ({key}: {reason})", key, "unreadable")
        for key, reason, samples in bad_done
        for sample in samples
    ]
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    for name in traced_per_sample(path):
        array = group[name]
        for key, samples in _files_of(array, done).items():
            file = f"{name}/{key}"
            if not (path / file).is_file():
                found += [Damage(s, name, f"chunk missing ({file})", file) for s in samples]
                continue
            try:
                stored = stored_chunks(array, path / file)
            except DamagedShard as error:
                found += [
                    Damage(s, name, f"shard damaged ({file}: {error})", file, "damaged") for s in samples
                ]
                continue
            if stored is not None:
                found += [
                    Damage(s, name, f"chunk missing from its shard ({file})", file)
                    for s in samples
                    if not stored[_local(array, s)].all()
                ]
    return sorted(found)


def damaged_samples(path: str | Path, *, deep: bool = False) -> list[Damage]:
    """`missing_data`, and with ``deep`` also the done samples whose chunks do not decode."""
    found = missing_data(path)
    if deep:
        known = {d.file for d in found}
        found += list(_unreadable(Path(path), skip=known))
    return sorted(found)


def unflagged(path: str | Path) -> list[tuple[str, list[int]]]:
    """(done file, samples) for each ``done`` file that is not on disk although samples
    of it have traced data: they read as not done and will be traced again. A kill
    between a shard's first data write and its flags leaves this too; a deleted ``done``
    file leaves it for every sample of the file. Either way it is said, not silent."""
    path = Path(path)
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    flags = group["done"]
    step = flags.metadata.chunk_grid.chunk_shape[0]
    variables = traced_per_sample(path)
    out = []
    for start in range(0, flags.shape[0], step):
        key = "done/" + flags.metadata.encode_chunk_key((start // step,))
        if (path / key).is_file():
            continue
        span = np.zeros(flags.shape[0], dtype=bool)
        span[start : start + step] = True
        with_data: set[int] = set()
        for name in variables:
            array = group[name]
            for chunk_key, samples in _files_of(array, span).items():
                file = path / name / chunk_key
                if not file.is_file():
                    continue
                try:
                    stored = stored_chunks(array, file)
                except DamagedShard:
                    continue  # unreadable data of samples that are not done: nothing to retrace from
                with_data.update(s for s in samples if stored is None or stored[_local(array, s)].any())
        if with_data:
            out.append((key, sorted(with_data)))
    return out


def unchecked(path: str | Path) -> list[str]:
    """Per-sample variables whose chunks carry no checksum (stores written before mechhi
    checksummed them): flipped bytes in them decode silently, no verify can find them."""
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    return [name for name in ["done", *traced_per_sample(path)] if not checksummed(group[name])]


def repair(path: str | Path, damage: list[Damage]) -> list[int]:
    """Make damaged samples pending again; return every sample marked not done.

    A damaged or unreadable sample's stored object (a whole shard file, in a sharded
    store) is deleted first: zarr reads a shard to merge every write into it, so a
    corrupt one would refuse the retrace too. The done samples that shared the deleted
    file lose that variable's data with it and are marked not done as well. Hold the
    writer lock."""
    path = Path(path)
    done, _ = done_flags(path)
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    lost = {d.sample for d in damage}
    for variable, file in sorted({(d.variable, d.file) for d in damage if d.kind != "missing"}):
        (path / file).unlink(missing_ok=True)
        if variable != "done":  # a done file's samples are all in `damage` already
            key = file.removeprefix(f"{variable}/")
            lost.update(_files_of(group[variable], done).get(key, []))
    unflag(path, sorted(lost))
    return sorted(lost)


def describe(damage: list[Damage], limit: int = 5) -> str:
    """'samples 3, 7 (attention chunk missing ...), ...' for one-line messages."""
    samples = sorted({d.sample for d in damage})
    shown = ", ".join(map(str, samples[:limit])) + (
        f" and {len(samples) - limit} more" if len(samples) > limit else ""
    )
    return f"{len(samples)} done sample(s) have lost data: {shown} (first: {damage[0].message})"


def samples_text(samples: Sequence[int]) -> str:
    """'sample 3', 'samples 8-15' or 'samples 1, 4 and 2 more' for messages."""
    if len(samples) == 1:
        return f"sample {samples[0]}"
    if list(samples) == list(range(samples[0], samples[-1] + 1)):
        return f"samples {samples[0]}-{samples[-1]}"
    return (
        "samples "
        + ", ".join(map(str, samples[:5]))
        + (f" and {len(samples) - 5} more" if len(samples) > 5 else "")
    )


def explain_read_error(path: str | Path, error: BaseException) -> str | None:
    """The one-line message for a read that failed on a corrupt chunk of the store at
    `path` (a crc32c mismatch, which zarr reports naming no file): which variable, file
    and samples, and the repair. None if `error` is no such failure, is a StoreError (which
    says it already) or nothing is found."""
    if (
        isinstance(error, StoreError)
        or not isinstance(error, ValueError)
        or "checksum do not match" not in str(error)
    ):
        return None
    try:
        damage = damaged_samples(path, deep=True)
    except Exception:
        return None
    if not damage:
        return None
    return (
        f"{path}: {describe(damage)}; `mechhi store verify --deep --repair {path}` marks them not done, then "
        "rerun the same `mechhi trace` to trace them again"
    )


def _files_of(array: zarr.Array, done: np.ndarray) -> dict[str, list[int]]:
    """key of each stored object (shard file, or chunk file when unsharded) that holds
    part of a done sample -> those samples, in order."""
    files: dict[str, list[int]] = {}
    for sample, key in _keys_of_done(array, done):
        files.setdefault(key, []).append(sample)
    return files


def _local(array: zarr.Array, sample: int) -> tuple[int, ...]:
    """Index of a sample's inner chunks in its shard's index (every inner chunk along the
    other dims: all of them must be stored)."""
    inner = array.metadata.codecs[0].chunk_shape[0]
    return ((sample % array.metadata.chunk_grid.chunk_shape[0]) // inner,)


def _keys_of_done(array: zarr.Array, done: np.ndarray) -> Iterator[tuple[int, str]]:
    """(sample, key of a stored object holding part of it) for every done sample; the
    sample axis is the first one in every traced variable."""
    chunk = array.metadata.chunk_grid.chunk_shape  # a shard's shape when sharded
    grid = [range(-(-size // c)) for size, c in zip(array.shape[1:], chunk[1:])]
    for sample in np.flatnonzero(done):
        for rest in itertools.product(*grid):
            yield int(sample), array.metadata.encode_chunk_key((int(sample) // chunk[0], *rest))


def _unreadable(path: Path, skip: set[str]) -> Iterator[Damage]:
    """Done samples whose chunks do not decode, one shard read at a time (each done
    sample alone only where its shard fails), in files not already in `skip`."""
    done, _ = done_flags(path)
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    for name in traced_per_sample(path):
        array = group[name]
        step = array.metadata.chunk_grid.chunk_shape[0]
        for key, samples in _files_of(array, done).items():
            file = f"{name}/{key}"
            if file in skip:
                continue
            start = samples[0] // step * step
            try:
                array[start : start + step]
                continue
            except Exception:
                pass
            for sample in samples:
                try:
                    array[sample]
                except Exception as error:
                    reason = " ".join(str(error).split()) or type(error).__name__
                    yield Damage(sample, name, f"chunk unreadable ({file}: {reason})", file, "unreadable")
