"""The fine-tuning data: splits of a dataset, the toy fine-tuning set (size words the
bundled model never saw), prepared batches and the seeded sample order."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ..data.format import KeyObjectDataset, Sample, load_dataset
from ..models import PreparedBatch, VLMAdapter

# The toy fine-tuning dataset: descriptions carry a size word ("a large red circle") that
# the bundled model never saw, so there is something new to learn.
TOY_FINETUNE_DATASET = Path("data/toy-finetune")


TOY_FINETUNE_IMAGES = 500


TOY_FINETUNE_SEED = 4_242  # a world seed that neither the toy training nor its held-out set uses


TOY_FINETUNE_SPLITS = {"train": 0.6, "val": 0.15, "test": 0.25}  # the paper's 1200 / 300 / 500


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a pure function of (seed, epoch), so resume is exact."""
    return np.random.default_rng([seed, epoch, 7]).permutation(n)


def micro_batches(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless stream of sample-index micro-batches, epoch after epoch (last one may be short)."""
    epoch = 0
    while True:
        order = epoch_order(n, seed, epoch)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]
        epoch += 1


def ensure_toy_dataset(path: str | os.PathLike = TOY_FINETUNE_DATASET, *, progress: bool = True) -> Path:
    """Build (or resume) the toy fine-tuning dataset with size words in the descriptions."""
    from ..toyworld.world import WorldConfig, build_synthetic

    return build_synthetic(path, n_images=TOY_FINETUNE_IMAGES, seed=TOY_FINETUNE_SEED,
                           splits=TOY_FINETUNE_SPLITS, config=WorldConfig(describe_size=True),
                           progress=progress)  # fmt: skip


def load_split(dataset: str | os.PathLike, split: str, limit: int | None = None) -> KeyObjectDataset:
    """One split of a dataset, failing with a clear message when it is empty."""
    data = load_dataset(dataset, split=split)
    if len(data) == 0:
        raise ValueError(f"dataset {dataset} has no samples in split {split!r} (splits: {load_dataset(dataset).split_counts()})")
    if limit is not None and limit < len(data):
        data.samples = data.samples[:limit]
    return data


def prepare_samples(adapter: VLMAdapter, samples: Sequence[Sample], template: str = "caption") -> PreparedBatch:
    return adapter.prepare([s.image() for s in samples], [s.description for s in samples], template=template)
