"""The fused query-slice attention capture: description-row attention without
``output_attentions``.

Asking a model for ``output_attentions=True`` forces eager attention and materialises
the full (batch, heads, seq, seq) matrix in every layer. mechhi needs only the rows of
the description tokens. So, in one nnsight trace per batch, each decoder layer's
attention call is intercepted *at its inputs*: the post-RoPE query and key states (k
after any cache update, not yet repeated for GQA), the mask handed to the attention
function, and its ``scaling``/``softcap``/``sliding_window`` keywords. From them the
tracer recomputes softmax for the description rows only, in float32, exactly as the
model's attention function would, while the model's own (SDPA / flash) kernel still
produces the forward pass.

What the capture costs beyond the plain forward (measured by `mechhi bench`): per
layer, a few (B, H, Q, S) float32 tensors, freed before the model moves on; the
(B, H, V) result, kept on the device until the end (one transfer, no sync per layer);
no KV cache (the forward runs with ``use_cache=False``); and the model stops right
after the last layer's attention inputs are read, so the last layer, the final norm
and the logits never run. Nothing grows with S^2, and nothing of one layer (q, k,
mask) outlives the reading of its rows.

Axis names used below: B batch, H query heads, Hkv key/value heads, G = H / Hkv,
Q description rows (padded to the longest in the batch), S key positions, V visual
tokens (padded), D head dim.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

import nnsight
import numpy as np
import torch

from mechhi.models import PreparedBatch, VLMAdapter
from mechhi.trace.sites import DecoderTracer, TracingError, find_attention_call, resolve


@dataclass(frozen=True)
class BatchIndex:
    """Padded gather indices for a batch: description rows and visual columns."""

    query: torch.Tensor  # (B, Q) long; padded entries repeat a valid index
    query_valid: torch.Tensor  # (B, Q) bool
    visual: torch.Tensor  # (B, V) long
    visual_valid: torch.Tensor  # (B, V) bool

    @functools.cached_property
    def query_weights(self) -> torch.Tensor:
        """(B, Q) float32: a mean over each sample's valid description rows."""
        weights = self.query_valid.float()
        return weights / weights.sum(-1, keepdim=True)

    @classmethod
    def from_batch(cls, batch: PreparedBatch, device: torch.device) -> BatchIndex:
        queries = [layout.query_positions for layout in batch.layouts]
        visuals = [np.concatenate([v.positions for v in layout.views]) for layout in batch.layouts]
        query, query_valid = _pad(queries, device)
        visual, visual_valid = _pad(visuals, device)
        return cls(query, query_valid, visual, visual_valid)


def _pad(rows: list[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    index = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        index[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        index[i, len(r) :] = int(r[0])
        valid[i, : len(r)] = True
    return index.to(device), valid.to(device)


def description_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    index: BatchIndex,
    *,
    scaling: float,
    softcap: float | None = None,
    sliding_window: int | None = None,
    causal: bool = True,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over description rows of the softmax probabilities on the visual tokens.

    ``query`` (B, H, T, D) and ``key`` (B, Hkv, S, D) are what the attention function
    receives; ``mask`` is what it receives too: None (causal if ``causal``), a 4-D bool
    mask (True = attend), a 4-D additive float mask, or a 2-D (B, S) padding mask
    (flash). A 4-D mask already holds causality and any sliding window; with None or
    2-D the attention function applies them itself, so they are applied here.
    ``bias``: the rows' additive mask from `row_bias` for this same mask, when the caller
    already has it (the tracer makes it once per trace and mask, not once per layer).
    Returns (B, H, V) float32; padded visual columns are 0.
    """
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TracingError(
            f"attention mask of type {type(mask).__name__} (flex attention?) is not supported: "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    batch, heads, _, dim = query.shape
    kv_heads, seq = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    rows = index.query.shape[1]
    q = query.gather(2, index.query[:, None, :, None].expand(batch, heads, rows, dim)).float()  # (B, H, Q, D)
    q = q.view(batch, kv_heads, groups * rows, dim)  # (B, Hkv, G*Q, D): heads h = kv*G + g
    logits = (q @ key.float().transpose(-1, -2)).view(batch, heads, rows, seq).mul_(scaling)  # (B, H, Q, S)
    if softcap is not None:
        logits = logits.div_(softcap).tanh_().mul_(softcap)
    logits += (
        row_bias(mask, index, seq, sliding_window=sliding_window, causal=causal) if bias is None else bias
    )
    probs = torch.softmax(logits, dim=-1)  # (B, H, Q, S)
    del logits
    mean = torch.einsum("bhqs,bq->bhs", probs, index.query_weights)  # (B, H, S)
    visual = mean.gather(2, index.visual[:, None, :].expand(batch, heads, -1))  # (B, H, V)
    return visual * index.visual_valid[:, None, :]


def row_bias(
    mask: torch.Tensor | None,
    index: BatchIndex,
    seq: int,
    *,
    sliding_window: int | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Additive (B or 1, 1, Q, S) float32 bias equal to the model's mask on the description
    rows (the mask conventions of `description_attention`)."""
    rows, device = index.query, index.query.device
    neg = torch.finfo(torch.float32).min
    if mask is not None and mask.dim() == 4:
        picked = mask[:, :, :, :seq].gather(
            2, rows[:, None, :, None].expand(mask.shape[0], mask.shape[1], -1, seq)
        )  # (B, 1, Q, S)
        if picked.dtype == torch.bool:
            return torch.zeros(picked.shape, device=device).masked_fill(~picked, neg)
        return picked.float().clamp(min=neg)
    # None or 2-D padding mask: the attention function applies causality itself.
    keys = torch.arange(seq, device=device)
    if causal:
        allowed = keys[None, None, :] <= rows[:, :, None]  # (B, Q, S)
    else:
        allowed = torch.ones((*rows.shape, seq), dtype=torch.bool, device=device)
    if sliding_window is not None:
        allowed &= keys[None, None, :] > rows[:, :, None] - sliding_window
    if mask is not None:
        if mask.dim() != 2:
            raise TracingError(f"unexpected attention mask of shape {tuple(mask.shape)}")
        allowed &= mask[:, None, -seq:].bool()
    return torch.zeros(allowed.shape, device=device).masked_fill(~allowed, neg)[:, None]


class AttentionTracer(DecoderTracer):
    """Runs batches through an nnsight-wrapped model and returns description attention.

    >>> tracer = AttentionTracer(model, adapter)
    >>> scores = tracer.trace(adapter.prepare(images, descriptions))  # (B, L, H, V) numpy
    """

    def __init__(self, model: torch.nn.Module, adapter: VLMAdapter) -> None:
        super().__init__(model, adapter)
        self.call_labels = [find_attention_call(resolve(layer, adapter.attention)) for layer in self.layers]

    def trace(self, batch: PreparedBatch) -> np.ndarray:
        """(B, L, H, V) float32 attention of the description rows on the visual tokens."""
        batch = batch.to(self.device, self.dtype)
        indices = {self.device: BatchIndex.from_batch(batch, self.device)}  # per device of a split model
        biases: dict[tuple, tuple] = {}  # one row bias per distinct mask, not per layer
        with torch.inference_mode(), self.nn.trace(**batch.inputs, use_cache=False) as tracer:
            per_layer = nnsight.save([])
            for layer, label in zip(self.layers, self.call_labels):
                per_layer.append(self._layer_rows(layer, label, indices, biases))  # (B, H, V), on the device
            tracer.stop()  # the rest of the forward (last layer, norm, logits) is not needed
        first = per_layer[0].device
        return torch.stack([rows.to(first) for rows in per_layer], dim=1).cpu().numpy()  # (B, L, H, V)

    def _layer_rows(
        self, layer: object, label: str, indices: dict[torch.device, BatchIndex], biases: dict[tuple, tuple]
    ) -> torch.Tensor:
        """One layer's (B, H, V), read inside the trace. A function of its own so that the
        layer's q, k and mask are referenced only until it returns: the model frees them
        before its MLP, as it would untraced. ``indices``: the batch's gather indices on
        each device met so far (a model split by a device map has layers on several)."""
        attention = resolve(layer, self.adapter.attention)
        args, kwargs = getattr(attention.source, label).inputs
        module, query, key = args[0], args[1], args[2]
        index = indices.get(query.device)
        if index is None:
            index = indices[query.device] = _index_to(next(iter(indices.values())), query.device)
        mask = args[4] if len(args) > 4 else kwargs.get("attention_mask")
        window, causal = kwargs.get("sliding_window"), getattr(module, "is_causal", True)
        return description_attention(
            query,
            key,
            mask,
            index,
            scaling=kwargs.get("scaling") or query.shape[-1] ** -0.5,  # SDPA's default
            softcap=kwargs.get("softcap"),
            sliding_window=window,
            causal=causal,
            bias=_cached_bias(biases, mask, index, key.shape[2], window, causal),
        )


def _index_to(index: BatchIndex, device: torch.device) -> BatchIndex:
    return BatchIndex(
        *(getattr(index, name).to(device) for name in ("query", "query_valid", "visual", "visual_valid"))
    )


def _cached_bias(
    biases: dict[tuple, tuple],
    mask: torch.Tensor | None,
    index: BatchIndex,
    seq: int,
    window: int | None,
    causal: bool,
) -> torch.Tensor:
    """The rows' bias for this mask, made once per trace: a model hands every layer the same
    mask object (or one per layer type). Keyed by the mask's id and checked by a weak
    reference, so a mask freed and another made at its address is never mistaken for it,
    and the cache keeps no mask alive."""
    key = (None if mask is None else id(mask), window, causal, seq, index.query.device)
    ref, bias = biases.get(key, (None, None))
    if bias is None or (mask is not None and ref() is not mask):
        bias = row_bias(mask, index, seq, sliding_window=window, causal=causal)
        biases[key] = (None if mask is None else weakref.ref(mask), bias)
    return bias
