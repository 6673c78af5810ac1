"""What is trained and scored: the answer (description) tokens. The same positions
perplexity scores, so the training loss and the evaluated metric measure one thing."""

from __future__ import annotations

import torch

from ..models import PreparedBatch


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


def answer_loss(model: torch.nn.Module, batch: PreparedBatch, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens (token t is predicted at t - 1); by
    default the answer tokens, ``answer_labels``."""
    labels = (answer_labels(batch) if labels is None else labels)[:, 1:]  # (B, T-1)
    logits = model(**batch.inputs).logits[:, :-1]  # (B, T-1, vocab)
    keep = labels != -100
    return torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep])  # only (n_answer, vocab) in float
