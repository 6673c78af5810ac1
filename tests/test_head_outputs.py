"""Head Pursuit's signal: each head's write into the residual stream, for every family.

Reference: the plain model (no nnsight) with a forward hook on every ``o_proj``; the
heads' writes must add up to the projection's own output (minus its bias) averaged over
the same positions, and each must equal its input slice times W_O's columns.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechhi.trace import HeadOutputTracer
from tests.conftest import noise_image
from tests.references import DESCRIPTIONS, SIZES, o_projections


def hooked_reference(model, adapter, batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, o_proj's input and output (B, T, .) from a plain forward pass."""
    inputs, outputs, handles = [], [], []

    def keep(_module, args, out) -> None:  # returns None: the output is left as it is
        inputs.append(args[0].detach())
        outputs.append(out.detach())

    for projection in o_projections(model, adapter):
        handles.append(projection.register_forward_hook(keep))
    try:
        with torch.no_grad():
            model(**batch.inputs)
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs


@pytest.mark.parametrize("positions", ["image", "answer"])
def test_head_writes_match_the_projection(tiny_case, positions):
    model, adapter = tiny_case
    sizes = SIZES if adapter.variable_image_size else [(224, 224)] * 3
    batch = adapter.prepare([noise_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)], DESCRIPTIONS)
    writes = HeadOutputTracer(model, adapter).trace(batch, positions=positions)
    hidden = adapter.text_config.hidden_size
    assert writes.shape == (3, adapter.n_layers, adapter.n_heads, hidden)
    inputs, outputs = hooked_reference(model, adapter, batch)
    projections = o_projections(model, adapter)
    for i, layout in enumerate(batch.layouts):
        where = (
            np.concatenate([v.positions for v in layout.views])
            if positions == "image"
            else layout.query_positions
        )
        for layer, projection in enumerate(projections):
            bias = projection.bias if projection.bias is not None else torch.zeros(hidden)
            total = (outputs[layer][i, where] - bias).mean(0).detach().numpy()
            np.testing.assert_allclose(writes[i, layer].sum(0), total, atol=1e-5, rtol=1e-4)
            head_dim = inputs[layer].shape[-1] // adapter.n_heads
            for head in (0, adapter.n_heads - 1):
                cols = slice(head * head_dim, (head + 1) * head_dim)
                own = (
                    (inputs[layer][i, where][:, cols] @ projection.weight[:, cols].T).mean(0).detach().numpy()
                )
                np.testing.assert_allclose(writes[i, layer, head], own, atol=1e-5, rtol=1e-4)
    assert not np.allclose(writes[:, :, 0], writes[:, :, -1]), "degenerate: heads write the same"


def test_head_writes_refuse_unknown_positions(tiny_case):
    model, adapter = tiny_case
    batch = adapter.prepare([noise_image(224, 224)], DESCRIPTIONS[:1])
    with pytest.raises(ValueError, match="choose from image, answer"):
        HeadOutputTracer(model, adapter).trace(batch, positions="prompt")
