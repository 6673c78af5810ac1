"""Perplexity over answer tokens, closed-ended VQA accuracy and answer probability.

The same code scores a base model and any adapter-carrying model: it needs only a
forward pass and the adapter's answer-token positions. Metrics follow the paper:

- perplexity = exp(mean over samples of the mean token NLL of the answer) (eq. 3); its
  standard error by the delta method, exp(m) * se(m);
- VQA: the prompt lists options A-D; the model's answer is the argmax over the four
  letter tokens at the answer position; AnsProb is the probability of the true letter
  renormalised over the four letters. Standard errors are over samples.

Every scorer takes a plain ``model`` callable (an intervention wraps it from outside)
and comes in two forms: from images and texts (`answer_predictions`, `vqa_scores`), and
from batches already prepared (`predictions_of`, `vqa_scores_of`), so an experiment
prepares its test split once and scores every model on the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mechhi.data.vqa import LETTERS, VQAItem, format_options
from mechhi.finetune.loss import answer_logits, predictions_of, scores_of
from mechhi.models import PreparedBatch, VLMAdapter
from mechhi.models._common import answer_token_ids


@dataclass(frozen=True)
class Metric:
    """A sample mean with its standard error."""

    mean: float
    se: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Metric:
        values = np.asarray(values, dtype=np.float64)
        se = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
        return cls(float(values.mean()), se, len(values))

    def as_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "se": self.se, "n": self.n}

    def __str__(self) -> str:
        return f"{self.mean:.4g} ± {self.se:.2g}"


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def caption_batches(
    adapter: VLMAdapter,
    images: Sequence[Image.Image],
    answers: Sequence[str],
    *,
    template: str = "caption",
    batch_size: int = 8,
) -> Iterator[PreparedBatch]:
    """(image, answer) pairs as prepared batches of ``batch_size``, one at a time."""
    for part in _batches(len(images), batch_size):
        yield adapter.prepare(images[part], answers[part], template=template)


def answer_predictions(
    model: torch.nn.Module,
    adapter: VLMAdapter,
    images: Sequence[Image.Image],
    answers: Sequence[str],
    *,
    template: str = "caption",
    batch_size: int = 8,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per sample (teacher forced): log-probabilities predicting each answer token
    (n_answer, vocab), and the answer token ids (n_answer,)."""
    return predictions_of(
        model, caption_batches(adapter, images, answers, template=template, batch_size=batch_size)
    )


def answer_scores(
    model: torch.nn.Module,
    adapter: VLMAdapter,
    images: Sequence[Image.Image],
    answers: Sequence[str],
    *,
    template: str = "caption",
    batch_size: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Per sample (teacher forced): mean NLL of the answer tokens, and the fraction of
    answer tokens that are the model's argmax prediction."""
    return scores_of(
        answer_predictions(model, adapter, images, answers, template=template, batch_size=batch_size)
    )


def perplexity_of(nll: Sequence[float] | np.ndarray) -> Metric:
    """exp of the mean over samples of the mean answer-token NLL (paper eq. 3), with the
    delta-method SE."""
    metric = Metric.of(nll)
    value = math.exp(metric.mean)
    return Metric(value, value * metric.se, metric.n)


def perplexity(
    model: torch.nn.Module,
    adapter: VLMAdapter,
    images: Sequence[Image.Image],
    answers: Sequence[str],
    **kwargs,
) -> Metric:
    """Perplexity over answer tokens (paper eq. 3) of a model on (image, answer) pairs."""
    return perplexity_of(answer_scores(model, adapter, images, answers, **kwargs)[0])


def letter_ids(adapter: VLMAdapter) -> list[int]:
    """Token id of each option letter as it appears in the VQA answer slot."""
    ids = []
    for letter in LETTERS:
        rendered = adapter.render("vqa", letter, options=format_options(LETTERS))
        tokens = answer_token_ids(adapter.tokenizer, rendered)
        ids.append(tokens[0])
    if len(set(ids)) != 4:
        raise ValueError("the option letters A-D do not map to four distinct tokens")
    return ids


def vqa_batches(
    adapter: VLMAdapter, items: Sequence[VQAItem], *, batch_size: int = 8
) -> Iterator[PreparedBatch]:
    """The questions as prepared batches: options A-D in the prompt, the true letter as the answer."""
    for part in _batches(len(items), batch_size):
        chunk = items[part]
        yield adapter.prepare(
            [it.image for it in chunk],
            [LETTERS[it.answer] for it in chunk],
            template="vqa",
            fields=[{"options": format_options(it.options)} for it in chunk],
        )


def vqa_scores_of(
    model: torch.nn.Module, letters: Sequence[int], batches: Iterable[PreparedBatch], answers: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """`vqa_scores` on batches already prepared (``answers``: each item's true option index)."""
    correct, probability = [], []
    truth = iter(answers)
    for batch in batches:
        c, p = vqa_from_logits(
            answer_logits(model, batch), batch, letters, [next(truth) for _ in batch.layouts]
        )
        correct.extend(c)
        probability.extend(p)
    return np.asarray(correct), np.asarray(probability)


def vqa_from_logits(
    logits: torch.Tensor, batch: PreparedBatch, letters: Sequence[int], answers: Sequence[int]
) -> tuple[list[float], list[float]]:
    """Per item of a batch whose ``logits`` are known: 1.0 where the argmax letter is the true
    one, and the true letter's probability renormalised over the four letters."""
    correct, probability = [], []
    for i, (layout, answer) in enumerate(zip(batch.layouts, answers)):
        scores = logits[i, int(layout.query_positions[0]) - 1, list(letters)].float().cpu()  # (4,)
        correct.append(float(int(scores.argmax()) == answer))
        probability.append(float(torch.softmax(scores, dim=-1)[answer]))
    return correct, probability


def vqa_scores(
    model: torch.nn.Module, adapter: VLMAdapter, items: Sequence[VQAItem], *, batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Per item: 1.0 where the argmax letter is the true one (else 0.0), and the true
    letter's probability renormalised over the four letters."""
    batches = vqa_batches(adapter, items, batch_size=batch_size)
    return vqa_scores_of(model, letter_ids(adapter), batches, [it.answer for it in items])


def closed_vqa(
    model: torch.nn.Module,
    adapter: VLMAdapter,
    items: Sequence[VQAItem],
    *,
    batch_size: int = 8,
) -> dict[str, Metric]:
    """Accuracy (argmax over the letters A-D) and AnsProb (renormalised true-letter probability)."""
    correct, probability = vqa_scores(model, adapter, items, batch_size=batch_size)
    return {"accuracy": Metric.of(correct), "ans_prob": Metric.of(probability)}
