"""Finding done samples whose data is gone, so that no probe scores NaN as if it were data.

Why: zarr reads a chunk that is not on disk as its fill value, and the store's fill
value is NaN, the same NaN that marks cells outside a sample's grid. A deleted chunk of a
done sample therefore reads as a sample the model looked at nowhere, and a rescore fails
much later on "NaN attention score" naming nothing useful. Every traced chunk is written
even when all NaN (``write_empty_chunks``), so for a done sample a missing stored object
(chunk, or shard once shards are used) always means lost data.

Two depths: `missing_data` looks only at which files exist (cheap: a directory listing,
run before every scoring and every resume); ``damaged_samples(deep=True)`` also reads
every done sample's chunks and reports those that do not decode (``mechhi store verify
--deep``). A damaged sample is retraced by the next `mechhi trace`: the trace job treats
missing data as not done, and `repair` marks unreadable ones not done (deleting the
corrupt shard file, whose other samples are then retraced too).

>>> [d.message for d in damaged_samples("stores/toy.zarr")]  # doctest: +SKIP
["sample 3: attention chunk missing (c/3/0/0/0/0)"]
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from .read import open_store
from .schema import is_traced_variable
from .write import unflag


@dataclass(frozen=True, order=True)
class Damage:
    """One done sample whose data in one variable is lost."""

    sample: int
    variable: str
    problem: str  # "chunk missing (<key>)" or "chunk unreadable (<error>)"

    @property
    def message(self) -> str:
        return f"sample {self.sample}: {self.variable} {self.problem}"


def traced_per_sample(path: str | Path) -> list[str]:
    """The traced variables that hold per-sample data (everything but ``done``)."""
    ds = open_store(path)
    return [str(n) for n in ds.data_vars if is_traced_variable(str(n)) and n != "done" and "sample" in ds[n].dims]


def missing_data(path: str | Path) -> list[Damage]:
    """Done samples with a traced variable whose stored object is not on disk."""
    path = Path(path)
    done = open_store(path)["done"].values.astype(bool)
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    found = []
    for name in traced_per_sample(path):
        present: dict[str, bool] = {}  # a shard holds many samples: look at each file once
        for sample, key in _keys_of_done(group[name], done):
            if not present.setdefault(key, (path / name / key).is_file()):
                found.append(Damage(sample, name, f"chunk missing ({key})"))
    return sorted(found)


def damaged_samples(path: str | Path, *, deep: bool = False) -> list[Damage]:
    """`missing_data`, and with ``deep`` also the done samples whose chunks do not decode."""
    found = missing_data(path)
    if deep:
        lost = {(d.sample, d.variable) for d in found}
        found += [d for d in _unreadable(Path(path)) if (d.sample, d.variable) not in lost]
    return sorted(found)


def repair(path: str | Path, damage: list[Damage]) -> list[int]:
    """Make damaged samples pending again; return every sample marked not done.

    An unreadable sample's stored object (a whole shard file, in a sharded store) is
    deleted first: zarr reads a shard to merge every write into it, so a corrupt one
    would refuse the retrace too. The done samples that shared the deleted file lose
    that variable's data with it and are marked not done as well. Hold the writer lock."""
    path = Path(path)
    done = open_store(path)["done"].values.astype(bool)
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    lost = {d.sample for d in damage}
    for variable in sorted({d.variable for d in damage if d.problem.startswith("chunk unreadable")}):
        broken = np.zeros_like(done)
        broken[[d.sample for d in damage if d.variable == variable]] = True
        bad_keys = {key for _, key in _keys_of_done(group[variable], broken)}
        for sample, key in _keys_of_done(group[variable], done):
            if key in bad_keys:
                (path / variable / key).unlink(missing_ok=True)
                lost.add(sample)
    unflag(path, sorted(lost))
    return sorted(lost)


def describe(damage: list[Damage], limit: int = 5) -> str:
    """'samples 3, 7 (attention chunk missing ...), ...' for one-line messages."""
    samples = sorted({d.sample for d in damage})
    shown = ", ".join(map(str, samples[:limit])) + (f" and {len(samples) - limit} more" if len(samples) > limit else "")
    return f"{len(samples)} done sample(s) have lost data: {shown} (first: {damage[0].message})"


def _keys_of_done(array: zarr.Array, done: np.ndarray) -> Iterator[tuple[int, str]]:
    """(sample, key of a stored object holding part of it) for every done sample; the
    sample axis is the first one in every traced variable."""
    chunk = array.metadata.chunk_grid.chunk_shape  # a shard's shape when sharded
    grid = [range(-(-size // c)) for size, c in zip(array.shape[1:], chunk[1:])]
    for sample in np.flatnonzero(done):
        for rest in itertools.product(*grid):
            yield int(sample), array.metadata.encode_chunk_key((int(sample) // chunk[0], *rest))


def _unreadable(path: Path) -> Iterator[Damage]:
    done = open_store(path)["done"].values.astype(bool)
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    for name in traced_per_sample(path):
        array = group[name]
        for sample in np.flatnonzero(done):
            try:
                array[int(sample)]
            except Exception as error:  # noqa: BLE001 - any decode or I/O failure is the finding
                reason = " ".join(str(error).split()) or type(error).__name__
                yield Damage(int(sample), name, f"chunk unreadable ({reason})")
