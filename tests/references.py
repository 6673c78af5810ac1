"""Plain-model references the tracer and intervention tests compare against: eager
attention matrices, every layer's ``o_proj`` found by hand, and heads edited with
forward pre-hooks (no tracer, no nnsight); and the descriptions and image sizes
(height, width) those tests prepare batches of."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch

DESCRIPTIONS = ["a red circle", "blue square", "a small green star"]
SIZES = [(100, 140), (224, 224), (84, 300)]


def eager_reference(model, batch) -> list[np.ndarray]:
    """(L, H, V) per sample from the full eager attention matrices."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**batch.inputs, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    refs = []
    for i, layout in enumerate(batch.layouts):
        visual = np.concatenate([v.positions for v in layout.views])
        rows = [a[i][:, layout.query_positions][:, :, visual].mean(1).numpy() for a in out.attentions]
        refs.append(np.stack(rows))
    return refs


def o_projections(model, adapter) -> list[torch.nn.Module]:
    """Every decoder layer's attention output projection, walked by hand from the adapter's paths."""
    layers = model
    for part in adapter.decoder_layers.split("."):
        layers = getattr(layers, part)
    out = []
    for layer in layers:
        attention = layer
        for part in adapter.attention.split("."):
            attention = getattr(attention, part)
        out.append(attention.o_proj)
    return out


@contextmanager
def hooked(model, adapter, edits: dict[tuple[int, int], Callable[[torch.Tensor], torch.Tensor]]):
    """The plain model with each (layer, head)'s columns of o_proj's input replaced by ``f(columns)``."""
    projections = o_projections(model, adapter)
    hd = projections[0].in_features // adapter.n_heads
    handles = []
    for layer in sorted({l for l, _ in edits}):
        heads = {h: f for (l, h), f in edits.items() if l == layer}

        def pre(_module, args, heads=heads):
            x = args[0].clone()
            for h, f in heads.items():
                x[..., h * hd : (h + 1) * hd] = f(x[..., h * hd : (h + 1) * hd])
            return (x, *args[1:])

        handles.append(projections[layer].register_forward_pre_hook(pre))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
