"""Closed-ended VQA metrics against a hand loop: letter position, renormalisation, argmax."""

from __future__ import annotations

import re

import numpy as np
import torch

from mechhi.data.vqa import LETTERS, VQAItem, format_options
from mechhi.evaluate.metrics import closed_vqa, letter_ids
from tests.conftest import noise_image, tiny

OPTIONS = [
    ("a red circle", "a blue star", "a green square", "a yellow star"),
    ("a blue star", "a red circle", "a small star", "a large square"),
    ("a green square", "a yellow star", "a blue star", "a red circle"),
]


def test_closed_vqa_matches_a_hand_loop():
    model, adapter = tiny("qwen2-vl", "gqa")
    items = [VQAItem(noise_image(84, 84, seed=i), OPTIONS[i], answer=i) for i in range(3)]
    got = closed_vqa(model, adapter, items, batch_size=2)
    letters = [adapter.tokenizer.convert_tokens_to_ids(letter) for letter in LETTERS]
    assert letter_ids(adapter) == letters
    correct, probability = [], []
    for item in items:
        text = adapter.render("vqa", LETTERS[item.answer], options=format_options(item.options)).text
        inputs = adapter.processor(text=[text], images=[[item.image]], return_tensors="pt")
        inputs = {k: v for k, v in inputs.items() if k in adapter.model_input_names()}
        ids = inputs["input_ids"][0].tolist()
        answer_at = len(ids) - 1 - ids[::-1].index(letters[item.answer])  # the letter after the options
        with torch.no_grad():
            logits = model(**inputs).logits[0, answer_at - 1]
        scores = logits[letters].double()
        correct.append(float(int(scores.argmax()) == item.answer))
        probability.append(float(torch.softmax(scores, 0)[item.answer]))
    assert got["accuracy"].mean == np.mean(correct)
    np.testing.assert_allclose(got["ans_prob"].mean, np.mean(probability), atol=1e-6)
    np.testing.assert_allclose(got["ans_prob"].se, np.std(probability, ddof=1) / np.sqrt(3), atol=1e-6)
    assert 0 < got["ans_prob"].mean < 1 and got["ans_prob"].mean != 0.25, "random model: not degenerate"


# ----------------------------------------------------------------------------- VQA options (issue 18, item 3)
def vqa_options_dataset(tmp_path):
    from mechhi.data.synthetic import build_synthetic

    return build_synthetic(tmp_path / "data", n_images=8, seed=3, progress=False)


def test_a_samples_options_do_not_depend_on_which_samples_are_drawn_with_it(tmp_path):
    from mechhi.data.format import load_dataset
    from mechhi.data.vqa import option_pool, vqa_items

    dataset = load_dataset(vqa_options_dataset(tmp_path))
    test = dataset.split("train")
    samples, pool = test.samples, option_pool(test)
    assert set(pool) == {s.description for s in dataset} and len(pool) > len({s.description for s in samples})

    def drawn(chosen):
        return {
            (s.image_id, s.object_id): (it.options, it.answer)
            for s, it in zip(chosen, vqa_items(chosen, [None] * len(chosen), seed=5, pool=pool))
        }

    every = drawn(samples)
    assert drawn(samples[::-1]) == every  # another order
    assert drawn(samples[-2:]) == {k: every[k] for k in list(every)[-2:]}  # a subset that skips the first
    whole = drawn(dataset.samples)  # drawn in the whole dataset: the same question
    assert {k: whole[k] for k in every} == every
    for sample in samples:  # what a question must be, whatever the draw
        options, answer = every[(sample.image_id, sample.object_id)]
        assert options[answer] == sample.description and len(set(options)) == 4
        assert not {o.description for o in sample.record.objects} & (set(options) - {sample.description})
    assert len({a for _, a in whole.values()}) == 4  # the true letter moves


def test_evaluate_asks_the_questions_trace_asks_under_any_limit(tmp_path):
    from mechhi.data.format import load_dataset
    from mechhi.evaluate.prepared import EvalSet, EvalSettings
    from mechhi.trace.trace_dataset import TraceConfig, prompt_fields

    _, adapter = tiny("qwen2-vl", "gqa")
    test = load_dataset(vqa_options_dataset(tmp_path)).split("train")
    traced = prompt_fields(TraceConfig(template="vqa"), test.samples[:2], test)  # `trace --limit 2`
    for limit in (2, None):
        built = EvalSet.build(adapter, test, EvalSettings(limit=limit, batch_size=2, generate=0))
        for sample, fields, answer in zip(test.samples[:2], traced, built.answers):
            options = re.split(r"(?:^| )[A-D]\) ", fields["options"])[
                1:
            ]  # "A) ... B) ...": the traced prompt
            assert len(options) == 4 and options[answer] == sample.description, (limit, options)
