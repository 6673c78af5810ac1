"""The capture's memory beyond the plain forward, counted deterministically.

`TensorBytes` follows every tensor an operation creates while it is active, so the
capture's peak minus the floor's peak is what tracing adds. It must be bounded by a few
of the capture's own (B, H, Q, S) rows per layer plus the (B, L, H, V) result: linear
in the sequence, far below one (H, S, S) matrix, and the same at 3 and at 6 layers
(nothing of a layer, no KV cache, piles up). A second check follows each layer's q
and k by weak reference: both must be gone by the time the model reaches that layer's
MLP, as they are when nothing traces it.
"""

from __future__ import annotations

import weakref

import pytest
import torch

import mechhi.trace.attention as attention_module
from mechhi.bench.memory import TensorBytes
from mechhi.bench.modes import floor, twin
from mechhi.models.qwen2_vl import Qwen2VLAdapter
from mechhi.models.tiny import tiny_qwen2_vl
from mechhi.trace import AttentionTracer
from mechhi.trace.sites import resolve
from tests.conftest import WORDS, noise_image

DESCRIPTION = "a red circle"  # Q = 3 description rows
SLACK = 16 * 1024  # index tensors and the like


def extra_bytes(layers: int, side: int) -> tuple[int, int, dict]:
    """(capture peak - floor peak, the allowed bound, sizes) on a tiny Qwen2-VL."""
    torch.manual_seed(0)
    model, processor = tiny_qwen2_vl(words=WORDS, layers=layers, max_pixels=28 * 28 * 1024)
    adapter = Qwen2VLAdapter(model.config, processor)
    batch = adapter.prepare([noise_image(side, side)], [DESCRIPTION])
    plain, tracer = twin(model), AttentionTracer(model, adapter)
    floor(plain, batch), tracer.trace(batch)  # first calls allocate caches of their own
    with TensorBytes() as floor_bytes:
        floor(plain, batch)
    with TensorBytes() as capture_bytes:
        tracer.trace(batch)
    sizes = {
        "B": 1,
        "H": adapter.n_heads,
        "Q": len(batch.layouts[0].query_positions),
        "L": layers,
        "S": batch.inputs["input_ids"].shape[1],
        "V": len(batch.layouts[0].views[0].positions),
    }
    rows = sizes["B"] * sizes["H"] * sizes["Q"] * sizes["S"] * 4  # one (B, H, Q, S) float32
    result = sizes["L"] * sizes["B"] * sizes["H"] * sizes["V"] * 4
    return capture_bytes.peak - floor_bytes.peak, 4 * rows + result + SLACK, sizes


@pytest.mark.parametrize("side", [448, 672])
def test_extra_memory_is_linear_in_the_sequence(side):
    extra, bound, sizes = extra_bytes(layers=6, side=side)
    one_matrix = sizes["H"] * sizes["S"] ** 2 * 4  # what output_attentions keeps per layer
    assert bound < one_matrix / 4, f"the bound must be far below one S^2 matrix to mean anything: {sizes}"
    assert extra <= bound, f"capture holds {extra} bytes beyond the floor, bound {bound} ({sizes})"


def test_extra_memory_does_not_accumulate_over_layers():
    shallow, _, sizes = extra_bytes(layers=3, side=448)
    deep, _, _ = extra_bytes(layers=6, side=448)
    three_more_results = 3 * sizes["B"] * sizes["H"] * sizes["V"] * 4
    # with a KV cache, or one layer's k kept per layer, 3 more layers add >= 3 * S * D * 4 bytes each
    assert deep - shallow <= three_more_results + SLACK // 4, (shallow, deep, sizes)


def test_no_layer_keeps_its_q_and_k_past_its_attention(tiny_case, monkeypatch):
    model, adapter = tiny_case
    tracer = AttentionTracer(model, adapter)
    followed: list[tuple[weakref.ref, weakref.ref]] = []
    real = attention_module.description_attention

    def following(query, key, *args, **kwargs):
        followed.append((weakref.ref(query), weakref.ref(key)))
        return real(query, key, *args, **kwargs)

    alive_at_mlp = []

    def check(_module, _inputs):  # runs as the model enters a layer's MLP
        alive_at_mlp.append([ref() is not None for pair in followed for ref in pair])

    monkeypatch.setattr(attention_module, "description_attention", following)
    hooks = [resolve(layer, "mlp")._module.register_forward_pre_hook(check) for layer in tracer.layers]
    try:
        tracer.trace(adapter.prepare([noise_image(224, 224)], [DESCRIPTION]))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(followed) == adapter.n_layers
    assert len(alive_at_mlp) == adapter.n_layers - 1, "the trace stops before the last layer's attention runs"
    assert not any(any(alive) for alive in alive_at_mlp), f"q/k alive at an MLP: {alive_at_mlp}"
