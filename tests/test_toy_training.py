"""Toy-model training: its object labels, its two phases, and resume after a kill."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mechhi.data.synthetic import COLOURS, SHAPES, WorldConfig, render_one
from mechhi.models.loading import load
from mechhi.models.toy import ToyConfig, build
from mechhi.toyworld import curriculum
from mechhi.toyworld import train as toy_train
from mechhi.toyworld.curriculum import caption_of, with_object_labels
from mechhi.toyworld.train import train

TINY = ToyConfig(
    layers=2,
    vision_steps=2,
    steps=3,
    caption_only_steps=1,
    batch_size=4,
    vqa_per_step=2,
    vision_batch_size=2,
    warmup=2,
    checkpoint_every=2,
    threads=1,
    option_probe_layer=1,
)


def test_object_labels_cover_exactly_the_tokens_the_mask_touches():
    _, adapter = build(replace(TINY, layers=1, option_probe_layer=0))
    scenes = [render_one(i, seed=5, config=WorldConfig()) for i in range(3)]
    batch = with_object_labels(
        adapter.prepare([im for _, im in scenes], [caption_of(r) for r, _ in scenes]), [r for r, _ in scenes]
    )
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
    initial = build(config)[0].state_dict()
    changed = {name for name, value in trained.items() if not torch.equal(value, initial[name])}
    assert changed, "the vision phase trained nothing"
    assert all(".visual." in name for name in changed), sorted(changed)[:5]


def test_killed_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    straight = train(TINY, out_dir=tmp_path / "straight", progress=False)

    resumed = tmp_path / "resumed"
    real_batches = curriculum.training_batches

    def dies_at_language_step_2(adapter, config, step):
        if step == 2:
            raise KeyboardInterrupt
        return real_batches(adapter, config, step)

    monkeypatch.setattr(toy_train, "training_batches", dies_at_language_step_2)
    with pytest.raises(KeyboardInterrupt):
        train(TINY, out_dir=resumed, progress=False)
    assert (resumed / "checkpoint.pt").exists()
    monkeypatch.setattr(toy_train, "training_batches", real_batches)
    train(TINY, out_dir=resumed, progress=False)

    assert not (resumed / "checkpoint.pt").exists()
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    steps = [json.loads(line)["step"] for line in (resumed / "training_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, TINY.vision_steps + TINY.steps + 1))


def test_resume_refuses_another_config(tmp_path, monkeypatch):
    monkeypatch.setattr(toy_train, "training_batches", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        train(TINY, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="another ToyConfig"):
        train(replace(TINY, lr=1e-4), out_dir=Path(tmp_path), progress=False)


def _attributes(description: str) -> tuple[str, str]:
    *_, colour, shape = description.split()
    return colour, shape


def test_lures_are_absent_objects_one_attribute_from_a_present_one():
    world = WorldConfig()
    for index in range(20):
        record, _ = render_one(index, seed=3, config=world)
        present = {_attributes(o.description) for o in record.objects}
        found = curriculum.lures(record, world)
        # by hand: every (colour, shape) of the world, sorted into the two kinds
        same_colour = {
            (c, s)
            for c in world.colours
            for s in world.shapes
            if (c, s) not in present and any(c == pc for pc, _ in present)
        }
        same_shape = {
            (c, s)
            for c in world.colours
            for s in world.shapes
            if (c, s) not in present and any(s == ps for _, ps in present)
        }
        assert {_attributes(d) for d in found["same colour"]} == same_colour
        assert {_attributes(d) for d in found["same shape"]} == same_shape


def test_training_questions_have_one_true_option_and_lures_at_the_asked_share():
    world = WorldConfig()
    scenes = [render_one(index, seed=3, config=world) for index in range(150)]

    def lure_rate(share: float) -> float:
        rng = np.random.default_rng(0)
        lured = 0
        for record, image in scenes:
            question = curriculum.training_question(record, image, rng, lure_share=share, world=world)
            present = {o.description for o in record.objects}
            assert len(set(question.options)) == 4
            assert [o in present for o in question.options] == [k == question.answer for k in range(4)]
            near = set().union(*curriculum.lures(record, world).values())
            lured += sum(o in near for o in question.options)
        return lured / (3 * len(scenes))

    assert lure_rate(1.0) == 1.0
    at_random = lure_rate(0.0)  # absent descriptions that happen to be lures
    assert lure_rate(0.75) == pytest.approx(0.75 + 0.25 * at_random, abs=0.05)
    assert at_random < 0.8


def test_language_learning_rate_holds_then_decays_to_zero():
    config = ToyConfig(vision_steps=10, steps=100, warmup=10, decay_share=0.3, lr=1e-3)
    language = [toy_train._lr(10 + step, config) for step in range(100)]
    assert language[0] == pytest.approx(1e-4)
    assert language[9:70] == [pytest.approx(1e-3)] * 61
    assert all(a >= b for a, b in itertools.pairwise(language[70:]))
    assert language[-1] < 1e-5


def test_lures_come_in_on_a_ramp_after_the_plateau():
    config = ToyConfig(lure_share=0.6, lure_ramp=(100, 300))
    assert [curriculum.lure_share_at(step, config) for step in (0, 100, 200, 300, 900)] == pytest.approx(
        [0, 0, 0.3, 0.6, 0.6]
    )


def test_option_probe_reads_each_option_last_word_and_knows_the_true_one():
    _, adapter = build(replace(TINY, layers=1, option_probe_layer=0))
    config = replace(TINY, caption_only_steps=0, batch_size=6, vqa_per_step=5)
    vqa = curriculum.training_batches(adapter, config, step=0)["vqa"]
    tokens = [
        adapter.tokenizer.convert_ids_to_tokens(row.tolist()) for row in vqa.prepared.inputs["input_ids"]
    ]
    words = [tokens[int(i)][int(p)] for i, p in vqa.option_index]
    assert len(words) == 5 * 4 and all(w in SHAPES for w in words)
    # by hand: the user text lists "X ) a[n] colour shape" four times; the probe's label is
    # whether that description is one of the scene's objects
    for i in range(5):
        text = tokens[i]
        starts = [k for k in range(len(text) - 1) if text[k] in "ABCD" and text[k + 1] == ")"]
        present = vqa.option_present[4 * i : 4 * i + 4].tolist()
        answer = text[int(vqa.prepared.layouts[i].query_positions[0])]
        assert present == [float(letter == answer) for letter in "ABCD"]
        assert [int(p) for s, p in vqa.option_index.tolist() if s == i] == [k + 4 for k in starts[:4]]
