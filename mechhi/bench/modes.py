"""What `mechhi bench` compares, on one model and one prepared batch.

- ``floor``: the plain forward, nothing read: no KV cache, logits for the last position
  only (``logits_to_keep=1``). No method that runs the model can cost less.
- ``capture``: mechhi's `AttentionTracer.trace`: description-row attention on the
  visual tokens, (B, L, H, V).
- ``eager``: what peer tools do: eager attention with ``output_attentions=True``, then
  the same (B, L, H, V) sliced out of the L returned (B, H, S, S) matrices.
- ``nnsight``: an nnsight trace with nothing in it, on the same wrapped model as the
  capture: nnsight's fixed cost per trace (`overhead`).

The floor and eager run on a twin of the model that shares its weights but was never
wrapped by nnsight (wrapping installs a forward on every module, for good), so the floor
is the model as transformers ships it.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mechhi.models import PreparedBatch, VLMAdapter
from mechhi.trace import AttentionTracer, BatchIndex

MODES = ("floor", "capture", "eager")
PLAIN = {"use_cache": False, "logits_to_keep": 1}  # what the floor asks of the model


def twin(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules that shares its parameters and buffers (no new weights)."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo=shared)


def floor(model: torch.nn.Module, batch: PreparedBatch) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch.inputs, **PLAIN).logits  # (B, 1, vocab)


def eager(model: torch.nn.Module, batch: PreparedBatch) -> np.ndarray:
    """(B, L, H, V) from eager ``output_attentions``, averaged over description rows.

    Only the language model is switched to eager (the vision tower keeps what the floor
    uses), so what eager costs beyond the floor is the text attention alone."""
    index = BatchIndex.from_batch(batch, batch.inputs["input_ids"].device)
    weights = index.query_valid.float() / index.query_valid.sum(-1, keepdim=True)  # (B, Q)
    previous = model.config.get_text_config()._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.inference_mode():
            out = model(**batch.inputs, **PLAIN, output_attentions=True)
            per_layer = [_rows_on_visual(a, index, weights) for a in out.attentions]  # L x (B, H, V)
    finally:
        model.set_attn_implementation({"text_config": previous})
    return torch.stack(per_layer, dim=1).cpu().numpy()


def _rows_on_visual(attention: torch.Tensor, index: BatchIndex, weights: torch.Tensor) -> torch.Tensor:
    batch, heads, _, seq = attention.shape
    rows = attention.gather(2, index.query[:, None, :, None].expand(batch, heads, -1, seq))  # (B, H, Q, S)
    mean = torch.einsum("bhqs,bq->bhs", rows.float(), weights)
    return mean.gather(2, index.visual[:, None, :].expand(batch, heads, -1)) * index.visual_valid[:, None]


def empty_trace(tracer: AttentionTracer, batch: PreparedBatch) -> None:
    """An nnsight trace that reads nothing: the full forward through nnsight."""
    with torch.inference_mode(), tracer.nn.trace(**batch.inputs, **PLAIN):
        pass


@dataclass
class Harness:
    """One model twice over: an unwrapped twin for floor and eager, the nnsight-wrapped
    model for the capture and the empty trace. Made once per model (the twin must be
    copied before nnsight wraps the model), used for any batch."""

    plain: torch.nn.Module
    tracer: AttentionTracer

    @classmethod
    def around(cls, model: torch.nn.Module, adapter: VLMAdapter) -> Harness:
        plain = twin(model)
        return cls(plain, AttentionTracer(model, adapter))

    def calls(self, batch: PreparedBatch) -> dict[str, Callable[[], Any]]:
        """The modes as zero-argument calls on ``batch``."""
        return {
            "floor": lambda: floor(self.plain, batch),
            "capture": lambda: self.tracer.trace(batch),
            "eager": lambda: eager(self.plain, batch),
            "nnsight": lambda: empty_trace(self.tracer, batch),
        }


def runners(
    model: torch.nn.Module, adapter: VLMAdapter, batch: PreparedBatch
) -> dict[str, Callable[[], Any]]:
    """The modes as zero-argument calls on a fresh `Harness`."""
    return Harness.around(model, adapter).calls(batch)


def eager_extra_bytes(*, layers: int, batch: int, heads: int, seq: int, dtype: torch.dtype) -> int:
    """Memory eager ``output_attentions`` needs beyond the floor: the L returned (B, H, S, S)
    matrices in the model's dtype; at the last layer, the float32 softmax of its logits
    (and, below float32, the cast back) alive beside them; and the (B, 1, S, S) additive
    mask eager attention is given."""
    size = torch.finfo(dtype).bits // 8
    cells = batch * heads * seq * seq
    softmax = cells * 4 + (cells * size if size < 4 else 0)
    return layers * cells * size + softmax + batch * seq * seq * size
