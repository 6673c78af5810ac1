"""The shipped toy model: loads offline and answers fixed held-out questions correctly.

A real check of the committed weights: a broken or untrained model fails it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from mechhi.evaluate import answer_predictions, answer_scores, closed_vqa
from mechhi.zoo.toy import (
    HELD_OUT_SEED,
    TOY_DIR,
    VQA_TARGET,
    ToyConfig,
    caption_of,
    held_out,
    vqa_item,
    word_accuracy,
)

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


def _fixed_vqa_accuracy(model, adapter) -> float:
    scenes = held_out(24, ToyConfig())
    rng = np.random.default_rng(HELD_OUT_SEED)
    items = [vqa_item(record, image, rng) for record, image in scenes]
    return closed_vqa(model, adapter, items, batch_size=12)["accuracy"].mean


def test_toy_answers_fixed_questions(toy):
    """Four options, so chance is 0.25 (random weights: 0.265 on 200 held-out
    scenes, metrics.json); measured: 0.71 on these 24."""
    accuracy = _fixed_vqa_accuracy(*toy)
    assert accuracy >= 0.55, f"VQA accuracy {accuracy:.3f}"


@pytest.mark.xfail(strict=True, reason="the shipped model reaches 0.70, not the target: see its model card")
def test_toy_reaches_the_vqa_target(toy):
    accuracy = _fixed_vqa_accuracy(*toy)
    assert accuracy >= VQA_TARGET - 0.05, f"VQA accuracy {accuracy:.3f}"


def test_toy_describes_objects(toy):
    model, adapter = toy
    scenes = held_out(16, ToyConfig())
    _, accuracy = answer_scores(model, adapter, [im for _, im in scenes], [caption_of(r) for r, _ in scenes])
    # Measured on 200 held-out scenes: 0.89 (random weights: 0.01); on these 16: 0.84.
    assert accuracy.mean() >= 0.75, f"caption token accuracy {accuracy.mean():.3f}"


def test_toy_names_the_colours_and_shapes_it_sees(toy):
    """Colour and shape words can only be right by looking at the image: the caption
    prefix is the same for every scene (chance: 1/6 for colours, 1/4 for shapes)."""
    model, adapter = toy
    scenes = held_out(24, ToyConfig())
    captions = [caption_of(r) for r, _ in scenes]
    words = word_accuracy(adapter, answer_predictions(model, adapter, [im for _, im in scenes], captions))
    assert words["colour"] >= 0.6, words  # measured: 0.75 here, 0.74 on 200 scenes
    assert words["shape"] >= 0.65, words  # measured: 0.83 here, 0.87 on 200 scenes
