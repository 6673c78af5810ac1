"""The shipped toy model: loads offline and answers fixed held-out questions correctly.

A real check of the committed weights: a broken or untrained model fails it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from mechhi.evaluate import answer_scores, closed_vqa
from mechhi.zoo.toy import HELD_OUT_SEED, TOY_DIR, ToyConfig, caption_of, held_out, vqa_item

pytestmark = pytest.mark.skipif(not (TOY_DIR / "model.safetensors").exists(), reason="toy model not trained")


@pytest.fixture(scope="module")
def toy():
    from mechhi.models.loading import load

    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # the bundled model must need no network at all
    try:
        yield load(TOY_DIR, device="cpu", dtype="float32")
    finally:
        if previous is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def test_toy_answers_fixed_questions(toy):
    model, adapter = toy
    scenes = held_out(24, ToyConfig())
    rng = np.random.default_rng(HELD_OUT_SEED)
    items = [vqa_item(record, image, rng) for record, image in scenes]
    vqa = closed_vqa(model, adapter, items, batch_size=12)
    assert vqa["accuracy"].mean >= 0.85, f"VQA accuracy {vqa['accuracy']}"


def test_toy_describes_objects(toy):
    model, adapter = toy
    scenes = held_out(16, ToyConfig())
    _, accuracy = answer_scores(model, adapter, [im for _, im in scenes], [caption_of(r) for r, _ in scenes])
    assert accuracy.mean() >= 0.8, f"caption token accuracy {accuracy.mean():.3f}"
