"""The trace's data pipeline: pending samples -> length-bucketed batches -> decoded,
masked and processed batches, made by `torch.utils.data.DataLoader` workers while the
model runs the previous batch.

Everything a batch needs before its forward is CPU work that does not touch the model:
decoding the images, running the processor (resize, normalise, tokenise, pad) and
carrying each object mask onto its token grid. Done in the forward's process, it would
run one step after another with the forward and the store write; in ``num_workers``
worker processes it overlaps with them. With ``num_workers=0`` the same code runs in
process, batch by batch.

Batches are bucketed by sequence length so that padding stays small: the pending
samples are ordered by their estimated length rounded up to ``BUCKET_TOKENS`` (a
bucket) and, within a bucket, by sample index; consecutive runs of ``batch_size`` of that
order are the batches. Samples of one bucket keep the dataset's order, so a dataset
whose samples all fall in one bucket is batched exactly as an unbucketed trace would.
In a sharded store the buckets are formed within each shard (or the fewest whole shards
that hold a batch), so a batch writes as few shard files as it can.
The estimate needs no image: the visual tokens come from `VLMAdapter.grid_sizes`.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mechhi.data.format import Sample
from mechhi.models import PreparedBatch, VLMAdapter

# Width of a length bucket, in tokens. Batches mix at most two neighbouring buckets, so a
# batch's padding is at most about two buckets per sample beyond what its lengths force.
BUCKET_TOKENS = 64
Grids = dict[str, tuple[int, int]]


def default_num_workers(device: torch.device) -> int:
    """Loader processes beside the forward. With the model on a GPU the CPU idles during
    the forward: up to 4, leaving a core to the main process. With the model on the CPU
    every worker takes a core from the forward's threads, which on a few cores costs
    more than preparing in process does (measured: README, "End-to-end trace"): 0 below
    8 cores, then one per 8 cores, up to 4."""
    cpus = os.cpu_count() or 1
    if device.type == "cpu":
        return min(4, cpus // 8)
    return max(0, min(4, cpus - 1))


@dataclass
class LoadedBatch:
    """One batch ready for the forward: its samples, model inputs, layouts and each
    sample's mask coverage per view (or the error that preparing it raised)."""

    indices: list[int]
    batch: PreparedBatch | None
    coverage: list[dict[str, np.ndarray]]
    error: BaseException | None = None

    def checked(self) -> LoadedBatch:
        """This batch, or its preparation error raised in the caller's process (a worker's
        error would otherwise arrive wrapped in a multi-line DataLoader message)."""
        if self.error is not None:
            raise self.error
        return self


class TraceSamples(Dataset):
    """Sample index -> (index, sample, template fields); `PrepareBatch` decodes them, so
    that a bad image is reported like any other preparation error."""

    def __init__(self, samples: Sequence[Sample], fields: Sequence[dict[str, str]]) -> None:
        self.samples = samples
        self.fields = fields

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple:
        return index, self.samples[index], self.fields[index]


class PrepareBatch:
    """DataLoader ``collate_fn``: decode a batch's images and masks, run the processor over
    them, and carry each mask onto its sample's grids. A class (not a closure) so that
    workers can pickle it."""

    def __init__(self, adapter: VLMAdapter, template: str) -> None:
        self.adapter = adapter
        self.template = template

    def __call__(self, items: list[tuple]) -> LoadedBatch:
        indices = [int(item[0]) for item in items]
        try:
            samples: list[Sample] = [item[1] for item in items]
            batch = self.adapter.prepare(
                [s.image(self.adapter) for s in samples],
                [s.description for s in samples],
                template=self.template,
                fields=[item[2] for item in items],
            )
            coverage = [layout.coverage(s.mask()) for layout, s in zip(batch.layouts, samples)]
        except Exception as error:
            return LoadedBatch(indices, None, [], error)
        return LoadedBatch(indices, batch, coverage)


def sequence_lengths(
    adapter: VLMAdapter, samples: Sequence[Sample], fields: Sequence[dict[str, str]], grids: Sequence[Grids]
) -> np.ndarray:
    """Each sample's length estimate: its visual tokens plus its description's (and VQA
    options') tokens; the prompt around them is the same for every sample."""
    texts = [" ".join([s.description, *f.values()]) for s, f in zip(samples, fields)]
    text_tokens = [len(ids) for ids in adapter.tokenizer(texts, add_special_tokens=False)["input_ids"]]
    visual = [sum(rows * cols for rows, cols in g.values()) for g in grids]
    return np.asarray(visual) + np.asarray(text_tokens)


def bucketed_batches(
    pending: Sequence[int],
    lengths: np.ndarray,
    batch_size: int,
    bucket_tokens: int = BUCKET_TOKENS,
    shard_samples: int = 0,
) -> list[list[int]]:
    """The pending samples in batches of ``batch_size``, ordered by length bucket, then
    by sample index; with ``shard_samples`` (the store's shard size, > 1), bucketed within
    windows of whole shards (one shard, or as few as hold a batch), so that a batch writes
    as few shard files as it can (zarr rewrites a whole shard on every write into it) and,
    with shards of whole batches, a rank's batches are the ones one process makes.

    >>> bucketed_batches([0, 1, 2, 3], np.array([300, 10, 290, 20]), 2)
    [[1, 3], [0, 2]]
    >>> bucketed_batches([0, 1, 2, 3], np.array([300, 10, 290, 20]), 2, shard_samples=2)
    [[1, 0], [3, 2]]
    """
    window = shard_samples * -(-batch_size // shard_samples) if shard_samples > 1 else len(lengths) or 1
    order = sorted(
        (int(i) for i in pending), key=lambda i: (i // window, -(-int(lengths[i]) // bucket_tokens), i)
    )
    batches: list[list[int]] = []
    for _, run in itertools.groupby(order, key=lambda i: i // window):
        shard = list(run)
        batches.extend(shard[start : start + batch_size] for start in range(0, len(shard), batch_size))
    return batches


def batch_loader(
    samples: Sequence[Sample],
    fields: Sequence[dict[str, str]],
    adapter: VLMAdapter,
    template: str,
    batches: list[list[int]],
    num_workers: int,
) -> DataLoader:
    """Batches in the given order, each prepared by one of ``num_workers`` processes (0:
    in this process), two batches ahead per worker."""
    return DataLoader(
        TraceSamples(samples, fields),
        batch_sampler=batches,
        collate_fn=PrepareBatch(adapter, template),
        num_workers=num_workers,
        prefetch_factor=2 if num_workers else None,
        persistent_workers=False,  # one pass over the pending samples
        pin_memory=False,  # inputs are small next to the forward; pinning would copy them once more
    )
