"""Closed-ended VQA metrics against a hand loop: letter position, renormalisation, argmax."""

from __future__ import annotations

import numpy as np
import torch

from mechhi.evaluate.metrics import LETTERS, VQAItem, closed_vqa, format_options, letter_ids
from tests.conftest import noise_image, tiny

OPTIONS = [("a red circle", "a blue star", "a green square", "a yellow star"),
           ("a blue star", "a red circle", "a small star", "a large square"),
           ("a green square", "a yellow star", "a blue star", "a red circle")]  # fmt: skip


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
