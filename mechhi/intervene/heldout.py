"""The default data of the causal checks: held-out scenes of the toy model's own world.

An ablation can only show harm where the model does well to begin with. On held-out
scenes of the default world the bundled model answers the four-option questions at
about 0.96 and its description perplexity is about 1.5; the fine-tuning set
(``data/toy-finetune``) adds size words the model never saw (perplexity 87), so it would
measure how ablation moves a model that is already lost. The scenes are drawn from the
world seed the toy model's card evaluates on (``HELD_OUT_SEED``), never used in
training, and built on first use, resumably, like the fine-tuning set.
"""

from __future__ import annotations

import os
from pathlib import Path

from mechhi.data.synthetic import build_synthetic
from mechhi.models.toy import HELD_OUT_SEED

HELD_OUT_DATASET = Path("data/toy-heldout")
HELD_OUT_IMAGES = 120  # about 240 object samples; the jobs use the first --limit of them
HELD_OUT_SPLIT = "test"


def ensure_heldout_dataset(path: str | os.PathLike = HELD_OUT_DATASET, *, progress: bool = True) -> Path:
    """Build (or resume) the held-out default-world scenes, all in the ``test`` split; the
    progress bar (stderr) shows only while images are still missing."""
    annotations = Path(path) / "annotations.jsonl"
    built = annotations.is_file() and len(annotations.read_text().splitlines()) >= HELD_OUT_IMAGES
    return build_synthetic(
        path,
        n_images=HELD_OUT_IMAGES,
        seed=HELD_OUT_SEED,
        splits={HELD_OUT_SPLIT: 1.0},
        progress=progress and not built,
    )
