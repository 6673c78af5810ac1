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

from ..models import PreparedBatch, VLMAdapter

LETTERS = ("A", "B", "C", "D")


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


@dataclass(frozen=True)
class VQAItem:
    image: Image.Image
    options: tuple[str, str, str, str]
    answer: int  # index of the true option


def format_options(options: Sequence[str]) -> str:
    return " ".join(f"{letter}) {text}" for letter, text in zip(LETTERS, options))


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _logits(model: torch.nn.Module, batch: PreparedBatch) -> torch.Tensor:
    from ..models.loading import input_device

    device = input_device(model)  # a model split by a device map: its embeddings' device
    dtype = next(model.parameters()).dtype
    moved = batch.to(device, dtype)
    with torch.no_grad():
        return model(**moved.inputs).logits.float().cpu()  # (B, T, vocab)


def caption_batches(
    adapter: VLMAdapter, images: Sequence[Image.Image], answers: Sequence[str], *, template: str = "caption",
    batch_size: int = 8,
) -> Iterator[PreparedBatch]:
    """(image, answer) pairs as prepared batches of ``batch_size``, one at a time."""
    for part in _batches(len(images), batch_size):
        yield adapter.prepare(images[part], answers[part], template=template)


def predictions_of(model: torch.nn.Module, batches: Iterable[PreparedBatch]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`answer_predictions` on batches already prepared (prepare once, score many models)."""
    for batch in batches:
        yield from predictions_from_logits(_logits(model, batch), batch)


def predictions_from_logits(logits: torch.Tensor, batch: PreparedBatch) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per sample of a batch whose (B, T, vocab) ``logits`` are known (a knockout or patched
    run): log-probabilities predicting each answer token, and the answer token ids."""
    logp = torch.log_softmax(logits.float().cpu(), dim=-1)
    ids = batch.inputs["input_ids"].cpu()
    for i, layout in enumerate(batch.layouts):
        pos = torch.as_tensor(layout.query_positions)
        yield logp[i, pos - 1], ids[i, pos]  # token t is predicted at t - 1


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
    return predictions_of(model, caption_batches(adapter, images, answers, template=template, batch_size=batch_size))


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
    return scores_of(answer_predictions(model, adapter, images, answers, template=template, batch_size=batch_size))


def scores_of(predictions: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    """`answer_scores` from already computed `answer_predictions`."""
    nll, accuracy = [], []
    for predicted, target in predictions:
        nll.append(float(-predicted.gather(-1, target[:, None]).mean()))
        accuracy.append(float((predicted.argmax(-1) == target).float().mean()))
    return np.asarray(nll), np.asarray(accuracy)


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
    from ..models._common import answer_token_ids

    ids = []
    for letter in LETTERS:
        rendered = adapter.render("vqa", letter, options=format_options(LETTERS))
        tokens = answer_token_ids(adapter.tokenizer, rendered)
        ids.append(tokens[0])
    if len(set(ids)) != 4:
        raise ValueError("the option letters A-D do not map to four distinct tokens")
    return ids


def vqa_batches(adapter: VLMAdapter, items: Sequence[VQAItem], *, batch_size: int = 8) -> Iterator[PreparedBatch]:
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
        c, p = vqa_from_logits(_logits(model, batch), batch, letters, [next(truth) for _ in batch.layouts])
        correct.extend(c)
        probability.extend(p)
    return np.asarray(correct), np.asarray(probability)


def vqa_from_logits(logits: torch.Tensor, batch: PreparedBatch, letters: Sequence[int],
                    answers: Sequence[int]) -> tuple[list[float], list[float]]:  # fmt: skip
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
