"""Toy-model training: its object labels, its two phases, and resume after a kill."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mechhi.data.synthetic import COLOURS, SHAPES, WorldConfig, render_one
from mechhi.models.loading import load
from mechhi.zoo import toy
from mechhi.zoo.toy import ToyConfig, caption_of, train, with_object_labels

TINY = ToyConfig(
    layers=2, vision_steps=2, steps=3, caption_only_steps=1, batch_size=4, vqa_per_step=2,
    vision_batch_size=2, warmup=2, checkpoint_every=2, threads=1,
)  # fmt: skip


def test_object_labels_cover_exactly_the_tokens_the_mask_touches():
    _, adapter = toy.build(replace(TINY, layers=1))
    scenes = [render_one(i, seed=5, config=WorldConfig()) for i in range(3)]
    batch = with_object_labels(adapter.prepare([im for _, im in scenes], [caption_of(r) for r, _ in scenes]),
                               [r for r, _ in scenes])  # fmt: skip
    rows = iter(range(len(batch.object_shape)))
    for index, (record, _) in enumerate(scenes):
        for obj in record.objects:
            row = next(rows)
            mask = obj.mask()  # 224 px, so each of the 8 x 8 tokens is a 28 px cell
            touched = mask.reshape(8, 28, 8, 28).any(axis=(1, 3)).ravel()
            expected = np.zeros(len(scenes) * 64, dtype=bool)
            expected[index * 64 : (index + 1) * 64] = touched
            weights = batch.object_weights[row].numpy()
            np.testing.assert_array_equal(weights > 0, expected)
            assert weights.sum() == pytest.approx(1.0, abs=1e-5)
            *_, colour, shape = obj.description.split()
            assert SHAPES[int(batch.object_shape[row])] == shape
            assert list(COLOURS)[int(batch.object_colour[row])] == colour
    assert next(rows, None) is None


def test_vision_phase_leaves_the_language_model_alone(tmp_path):
    config = replace(TINY, steps=0)
    train(config, out_dir=tmp_path, progress=False)
    trained = load(tmp_path, device="cpu", dtype="float32")[0].state_dict()
    initial = toy.build(config)[0].state_dict()
    changed = {name for name, value in trained.items() if not torch.equal(value, initial[name])}
    assert changed, "the vision phase trained nothing"
    assert all(".visual." in name for name in changed), sorted(changed)[:5]


def test_killed_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    straight = train(TINY, out_dir=tmp_path / "straight", progress=False)

    resumed = tmp_path / "resumed"
    real_batches = toy.training_batches

    def dies_at_language_step_2(adapter, config, step):
        if step == 2:
            raise KeyboardInterrupt
        return real_batches(adapter, config, step)

    monkeypatch.setattr(toy, "training_batches", dies_at_language_step_2)
    with pytest.raises(KeyboardInterrupt):
        train(TINY, out_dir=resumed, progress=False)
    assert (resumed / "checkpoint.pt").exists()
    monkeypatch.setattr(toy, "training_batches", real_batches)
    train(TINY, out_dir=resumed, progress=False)

    assert not (resumed / "checkpoint.pt").exists()
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    steps = [json.loads(line)["step"] for line in (resumed / "training_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, TINY.vision_steps + TINY.steps + 1))


def test_resume_refuses_another_config(tmp_path, monkeypatch):
    monkeypatch.setattr(toy, "training_batches", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train(TINY, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="another ToyConfig"):
        train(replace(TINY, lr=1e-4), out_dir=Path(tmp_path), progress=False)
