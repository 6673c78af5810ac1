"""Closed-ended questions for evaluation: one true description and three drawn (seeded)
from other samples' descriptions that describe no object of the same image, so a
"false" option is never true."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..data.format import Sample
from .metrics import VQAItem


def vqa_items(
    samples: Sequence[Sample], images: Sequence[Any], *, seed: int, pool: Sequence[str] | None = None
) -> list[VQAItem]:
    """One 4-option question per sample: its description and three descriptions drawn from
    ``pool`` (default: the samples' own) that name no object of its own image, in a
    seeded random order."""
    rng = np.random.default_rng(seed)
    pool_all = sorted(set(pool) if pool is not None else {s.description for s in samples})
    items = []
    for sample, image in zip(samples, images):
        present = {o.description for o in sample.record.objects}
        pool = [d for d in pool_all if d not in present]
        if len(pool) < 3:
            raise ValueError(f"VQA for sample {sample.index}: only {len(pool)} other descriptions to draw 3 distractors from")
        options = [pool[i] for i in rng.choice(len(pool), size=3, replace=False)]
        answer = int(rng.integers(4))
        options.insert(answer, sample.description)
        items.append(VQAItem(image=image, options=tuple(options), answer=answer))  # type: ignore[arg-type]
    return items
