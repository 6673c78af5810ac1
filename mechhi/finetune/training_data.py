"""The fine-tuning data, read once per run: the train and validation samples of one
reading of ``annotations.jsonl``, their decoded images (`ImageCache`), the toy
fine-tuning set (size words the bundled model never saw), and prepared batches.

`FinetuneData` is what a run trains on; `mechhi experiment` builds one and hands it to
every setup, so the dataset is read, and its images decoded, once for all setups.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mechhi.data.format import KeyObjectDataset, Sample, load_dataset
from mechhi.data.images import ImageCache
from mechhi.data.splits import split_of
from mechhi.data.synthetic import WorldConfig, build_synthetic
from mechhi.models import PreparedBatch, VLMAdapter

# The toy fine-tuning dataset: descriptions carry a size word ("a large red circle") that
# the bundled model never saw, so there is something new to learn.
TOY_FINETUNE_DATASET = Path("data/toy-finetune")


TOY_FINETUNE_IMAGES = 500


TOY_FINETUNE_SEED = 4_242  # a world seed that neither the toy training nor its held-out set uses


TOY_FINETUNE_SPLITS = {"train": 0.6, "val": 0.15, "test": 0.25}  # the paper's 1200 / 300 / 500


def ensure_toy_dataset(path: str | os.PathLike = TOY_FINETUNE_DATASET, *, progress: bool = True) -> Path:
    """Build (or resume) the toy fine-tuning dataset with size words in the descriptions."""
    return build_synthetic(
        path,
        n_images=TOY_FINETUNE_IMAGES,
        seed=TOY_FINETUNE_SEED,
        splits=TOY_FINETUNE_SPLITS,
        config=WorldConfig(describe_size=True),
        progress=progress,
    )


def prepare_samples(
    adapter: VLMAdapter,
    samples: Sequence[Sample],
    template: str = "caption",
    images: ImageCache | None = None,
) -> PreparedBatch:
    """Model inputs for (image, description) samples; images from ``images`` when given."""
    pictures = images.images(samples) if images is not None else [s.image() for s in samples]
    return adapter.prepare(pictures, [s.description for s in samples], template=template)


@dataclass
class FinetuneData:
    """The samples a run trains and validates on, from one reading of the dataset."""

    root: Path
    fingerprint: str  # of the dataset's content (annotations and image files)
    train: list[Sample]
    val: list[Sample]
    images: ImageCache = field(default_factory=ImageCache)
    _validation: dict = field(default_factory=dict, repr=False)  # prepared batches, see `validation_batches`

    @classmethod
    def read(
        cls,
        dataset: str | os.PathLike | KeyObjectDataset,
        *,
        train_limit: int | None = None,
        val_limit: int | None = None,
        images: ImageCache | None = None,
    ) -> FinetuneData:
        """The train and val splits of a dataset directory (read once) or of a dataset already read."""
        data = dataset if isinstance(dataset, KeyObjectDataset) else load_dataset(dataset)
        return cls(
            Path(data.root),
            data.fingerprint,
            split_of(data, "train", train_limit).samples,
            split_of(data, "val", val_limit).samples,
            images or ImageCache(),
        )

    def validation_batches(
        self, adapter: VLMAdapter, *, template: str, batch_size: int, rank: int = 0, world: int = 1
    ) -> list[PreparedBatch]:
        """This rank's share of the validation samples (every ``world``-th), prepared once
        and kept: every validation of the run, and of every run given this data, reuses them."""
        key = (id(adapter), template, batch_size, rank, world)
        if key not in self._validation:
            mine = self.val[rank::world]
            self._validation[key] = [
                prepare_samples(adapter, mine[i : i + batch_size], template, self.images)
                for i in range(0, len(mine), batch_size)
            ]
        return self._validation[key]
