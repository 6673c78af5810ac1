"""Closed-ended questions for evaluation: one true description and three drawn (seeded)
from the dataset's other descriptions that describe no object of the same image, so a
"false" option is never true.

A sample's options are a function of (seed, the sample's id, the pool) alone: each
sample draws from its own generator, seeded by a hash of the seed and its (image id,
object id), from the distinct descriptions of the whole dataset (every split). So a
sample is asked the same question by `mechhi evaluate`, `mechhi trace --template vqa`
and `mechhi ablate`, whatever ``--limit``, split or sample order selects it, and a
resumed trace asks what the first run asked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from mechhi.data.format import KeyObjectDataset, Sample

# How options are drawn; recorded (stores, caches) so results of another draw are never mixed in.
LETTERS = ("A", "B", "C", "D")
VQA_DRAW = "per-sample"


@dataclass(frozen=True)
class VQAItem:
    image: Image.Image
    options: tuple[str, str, str, str]
    answer: int  # index of the true option


def format_options(options: Sequence[str]) -> str:
    return " ".join(f"{letter}) {text}" for letter, text in zip(LETTERS, options))


def option_pool(data: KeyObjectDataset | Sequence[Sample]) -> list[str]:
    """The descriptions options are drawn from: every usable object's in the whole dataset
    (all splits) of a loaded dataset or split; of a bare list of samples, their images' objects'."""
    if isinstance(data, KeyObjectDataset):
        return sorted(data.all_descriptions)
    return sorted({o.description for s in data for o in s.record.objects})


def sample_options(sample: Sample, pool: Sequence[str], *, seed: int) -> tuple[tuple[str, ...], int]:
    """(options A-D, index of the true one) for ``sample``: three distractors from ``pool``
    that name no object of its image, and the true description at a drawn place."""
    present = {o.description for o in sample.record.objects}
    candidates = sorted(set(pool) - present)
    if len(candidates) < 3:
        raise ValueError(
            f"VQA for image {sample.image_id!r} object {sample.object_id!r}: the dataset has "
            f"only {len(candidates)} other descriptions to draw 3 distractors from"
        )
    rng = np.random.default_rng(_sample_entropy(seed, sample.image_id, sample.object_id))
    options = [candidates[i] for i in rng.choice(len(candidates), size=3, replace=False)]
    answer = int(rng.integers(4))
    options.insert(answer, sample.description)
    return tuple(options), answer  # type: ignore[return-value]


def vqa_items(
    samples: Sequence[Sample], images: Sequence[Any], *, seed: int, pool: Sequence[str]
) -> list[VQAItem]:
    """One 4-option question per sample (`sample_options`); ``pool``: `option_pool` of the
    samples' dataset."""
    items = []
    for sample, image in zip(samples, images):
        options, answer = sample_options(sample, pool, seed=seed)
        items.append(VQAItem(image=image, options=options, answer=answer))
    return items


def _sample_entropy(seed: int, image_id: str, object_id: str) -> list[int]:
    """A generator seed from (seed, image id, object id) that every process computes alike
    (Python's ``hash`` of a str is salted per process)."""
    digest = hashlib.sha256(f"{int(seed)}\0{image_id}\0{object_id}".encode()).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
