"""What is trained and scored: the answer (description) tokens. The same positions
perplexity scores, so the training loss and the evaluated metric measure one thing.

Two reductions. ``"token"``: the mean over every answer token of the batch (the toy
world's pretraining uses it). ``"sample"``: the mean over samples of each sample's mean
answer-token NLL, the quantity perplexity exponentiates (paper eq. 3); fine-tuning uses
it because it also makes data parallelism exact: the mean over ranks of per-rank sample
means *is* the sample mean of the whole batch, whatever each sample's answer length.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal

import numpy as np
import torch

from mechhi.models import PreparedBatch
from mechhi.models.loading import input_device


def answer_labels(batch: PreparedBatch) -> torch.Tensor:
    """(B, T) labels: the input id at each answer (description) token, -100 elsewhere.

    The same positions perplexity scores (the adapter's ``query_positions``), so the
    training loss and the evaluated metric measure one thing.
    """
    ids = batch.inputs["input_ids"]
    labels = torch.full_like(ids, -100)
    for i, layout in enumerate(batch.layouts):
        pos = torch.as_tensor(layout.query_positions)
        labels[i, pos] = ids[i, pos]
    return labels


def answer_loss(
    model: torch.nn.Module,
    batch: PreparedBatch,
    labels: torch.Tensor | None = None,
    *,
    reduction: Literal["token", "sample"] = "token",
) -> torch.Tensor:
    """Cross-entropy over the labelled tokens (token t is predicted at t - 1), by default
    the answer tokens (`answer_labels`); averaged over tokens, or per sample then over samples."""
    labels = (answer_labels(batch) if labels is None else labels)[:, 1:]  # (B, T-1)
    logits = model(**batch.inputs).logits[:, :-1]  # (B, T-1, vocab)
    keep = labels != -100
    nll = torch.nn.functional.cross_entropy(
        logits[keep].float(), labels[keep], reduction="none"
    )  # (n_answer,)
    if reduction == "token":
        return nll.mean()
    rows = keep.nonzero()[:, 0]  # (n_answer,) the sample of each labelled token
    counts = keep.sum(1)  # (B,)
    per_sample = torch.zeros(len(counts), dtype=nll.dtype, device=nll.device).index_add(0, rows, nll)
    return (per_sample[counts > 0] / counts[counts > 0]).mean()


# ------------------------------------------------- the same tokens, scored (validation and evaluation)
def answer_logits(model: torch.nn.Module, batch: PreparedBatch) -> torch.Tensor:
    """(B, T, vocab) float32 logits of one prepared batch on CPU, without gradients."""
    device = input_device(model)  # a model split by a device map: its embeddings' device
    dtype = next(model.parameters()).dtype
    moved = batch.to(device, dtype)
    with torch.no_grad():
        return model(**moved.inputs).logits.float().cpu()  # (B, T, vocab)


def predictions_of(
    model: torch.nn.Module, batches: Iterable[PreparedBatch]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`answer_predictions` on batches already prepared (prepare once, score many models)."""
    for batch in batches:
        yield from predictions_from_logits(answer_logits(model, batch), batch)


def predictions_from_logits(
    logits: torch.Tensor, batch: PreparedBatch
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per sample of a batch whose (B, T, vocab) ``logits`` are known (a knockout or patched
    run): log-probabilities predicting each answer token, and the answer token ids."""
    logp = torch.log_softmax(logits.float().cpu(), dim=-1)
    ids = batch.inputs["input_ids"].cpu()
    for i, layout in enumerate(batch.layouts):
        pos = torch.as_tensor(layout.query_positions)
        yield logp[i, pos - 1], ids[i, pos]  # token t is predicted at t - 1


def scores_of(predictions: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    """`answer_scores` from already computed `answer_predictions`."""
    nll, accuracy = [], []
    for predicted, target in predictions:
        nll.append(float(-predicted.gather(-1, target[:, None]).mean()))
        accuracy.append(float((predicted.argmax(-1) == target).float().mean()))
    return np.asarray(nll), np.asarray(accuracy)
