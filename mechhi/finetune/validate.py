"""Validation loss for early stopping: the log of the paper's perplexity on the val split.

Computed on batches prepared once (`FinetuneData.validation_batches`), each process on
its share of the samples; the per-sample values are gathered, so every process gets the
same loss and takes the same early-stopping decision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from mechhi.data.format import Sample
from mechhi.finetune.loss import predictions_of, scores_of
from mechhi.finetune.training_data import prepare_samples
from mechhi.models import PreparedBatch, VLMAdapter


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def sample_nll(model: torch.nn.Module, batches: Sequence[PreparedBatch]) -> np.ndarray:
    """(n,) mean answer-token NLL of each sample of the prepared batches."""
    with _eval_mode(model):
        return scores_of(predictions_of(model, batches))[0]


def validation_loss(
    model: torch.nn.Module,
    adapter: VLMAdapter,
    samples: Sequence[Sample],
    *,
    batch_size: int,
    template: str = "caption",
) -> float:
    """Mean over samples of the mean answer-token NLL: log of the paper's perplexity."""
    batches = [
        prepare_samples(adapter, samples[i : i + batch_size], template)
        for i in range(0, len(samples), batch_size)
    ]
    return float(np.mean(sample_nll(model, batches)))


def gathered_loss(
    model: torch.nn.Module, batches: Sequence[PreparedBatch], accelerator: Any, n_total: int
) -> float:
    """The validation loss over every process's share (the same value on every process)."""
    mine = sample_nll(model, batches) if batches else np.zeros(0)
    width = -(-n_total // accelerator.num_processes)  # ceil: the largest share
    padded = torch.full((width,), float("nan"), dtype=torch.float64, device=accelerator.device)
    padded[: len(mine)] = torch.as_tensor(mine, dtype=torch.float64)
    every = accelerator.gather(padded).cpu().numpy()  # (processes * width,)
    return float(np.mean(every[np.isfinite(every)]))
