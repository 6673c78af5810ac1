"""Each head's write into the residual stream, captured at the input of ``o_proj``:
the signal of Head Pursuit (``probes.head_pursuit``)."""

from __future__ import annotations

import nnsight
import numpy as np
import torch

from mechhi.models import PreparedBatch, VLMAdapter
from mechhi.trace.attention import BatchIndex
from mechhi.trace.sites import DecoderTracer, output_projections


class HeadOutputTracer(DecoderTracer):
    """Each head's write into the residual stream, averaged over chosen token positions
    (the signal of Head Pursuit, ``probes.head_pursuit``).

    Where: the input of each attention module's output projection ``o_proj`` is the
    heads' outputs side by side (B, T, heads * head_dim), so head h's write is its slice
    times W_O's matching columns. Averaging is linear, so the slice is averaged over the
    positions inside the trace (only (B, heads * head_dim) per layer leaves it) and
    multiplied by W_O after. The model stops after the last layer's projection input.

    >>> tracer = HeadOutputTracer(model, adapter)
    >>> writes = tracer.trace(batch, positions="image")  # (B, L, H, hidden) numpy
    """

    POSITIONS = ("image", "answer")

    def __init__(self, model: torch.nn.Module, adapter: VLMAdapter) -> None:
        super().__init__(model, adapter)
        self.projections = output_projections(self.nn, adapter)

    def trace(self, batch: PreparedBatch, positions: str = "image") -> np.ndarray:
        """(B, L, H, hidden) float32: per head, its write averaged over the sample's visual
        tokens (``image``, all views) or over its description tokens (``answer``)."""
        if positions not in self.POSITIONS:
            raise ValueError(f"positions={positions!r}: choose from {', '.join(self.POSITIONS)}")
        batch = batch.to(self.device, self.dtype)
        index = BatchIndex.from_batch(batch, self.device)
        where, valid = (
            (index.visual, index.visual_valid) if positions == "image" else (index.query, index.query_valid)
        )
        weights = (valid.float() / valid.sum(1, keepdim=True))[
            ..., None
        ]  # (B, P, 1): a mean over valid positions
        with torch.inference_mode(), self.nn.trace(**batch.inputs, use_cache=False) as tracer:
            per_layer = nnsight.save([])
            for projection in self.projections:
                per_layer.append(
                    _mean_input(projection, where, weights)
                )  # (B, heads * head_dim), on the device
            tracer.stop()
        writes = []
        for mean_out, projection in zip(per_layer, self.projections):
            # W_O in float32 one layer at a time: a copy of every layer's would cost a
            # 7B model about 1.4 GB for the tracer's whole life
            weight = projection._module.weight.detach()
            w_o = weight.float().reshape(weight.shape[0], self.adapter.n_heads, -1)  # (hidden, H, hd)
            per_head = mean_out.to(w_o.device).reshape(
                mean_out.shape[0], self.adapter.n_heads, -1
            )  # (B, H, hd)
            writes.append(torch.einsum("bhk,dhk->bhd", per_head, w_o))
        return torch.stack(writes, dim=1).cpu().numpy()  # (B, L, H, hidden): one transfer


def _mean_input(projection: object, where: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The projection's input averaged over the chosen positions, read inside the trace (a
    function of its own, so the (B, T, heads * head_dim) input is not held past it)."""
    heads_out = projection.input  # (B, T, heads * head_dim)
    picked = heads_out.gather(
        1, where[..., None].expand(-1, -1, heads_out.shape[-1])
    )  # (B, P, heads * head_dim)
    return (picked.float() * weights).sum(1)
