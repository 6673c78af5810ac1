"""The tracer's cube must equal eager ``output_attentions=True``, for every family.

Reference: the model itself under eager attention, asked for all attention matrices;
sliced to description rows x visual tokens and averaged over rows, in float32.
"""

from __future__ import annotations

import numpy as np
import pytest

from mechhi.trace import AttentionTracer, find_attention_call
from tests.conftest import noise_image
from tests.references import DESCRIPTIONS, SIZES, eager_reference


def traced(model, adapter, images, descriptions):
    batch = adapter.prepare(images, descriptions)
    return batch, AttentionTracer(model, adapter).trace(batch)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_tracer_equals_eager_attention(tiny_case, batch_size):
    model, adapter = tiny_case
    sizes = SIZES[:batch_size] if adapter.variable_image_size else [(224, 224)] * batch_size
    images = [noise_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    batch, cube = traced(model, adapter, images, DESCRIPTIONS[:batch_size])
    assert cube.shape[:3] == (batch_size, adapter.n_layers, adapter.n_heads)
    for i, ref in enumerate(eager_reference(model, batch)):
        np.testing.assert_allclose(cube[i, :, :, : ref.shape[-1]], ref, atol=1e-5, rtol=0)
        assert not np.allclose(ref, ref.mean()), "degenerate reference: all scores equal"


def test_padded_batch_equals_one_at_a_time(tiny_case):
    model, adapter = tiny_case
    sizes = SIZES if adapter.variable_image_size else [(224, 224)] * 3
    images = [noise_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    _, cube = traced(model, adapter, images, DESCRIPTIONS)
    for i in range(3):
        _, single = traced(model, adapter, images[i : i + 1], DESCRIPTIONS[i : i + 1])
        width = single.shape[-1]
        np.testing.assert_allclose(cube[i, :, :, :width], single[0], atol=1e-5, rtol=0)
        assert np.all(cube[i, :, :, width:] == 0), "padding columns must be empty"


def test_attention_call_is_found_not_hardcoded(tiny_case):
    """The label found is the one whose source line calls the attention function with q/k."""
    model, adapter = tiny_case
    tracer = AttentionTracer(model, adapter)
    assert len(tracer.call_labels) == adapter.n_layers
    attention = tracer.layers[0]
    for part in adapter.attention.split("."):
        attention = getattr(attention, part)
    source = attention.source
    label = find_attention_call(attention)
    line = source.compiled.source.splitlines()[source.compiled.lines[label] - 1]
    assert "attention_interface(" in line and "get_interface" not in line, line
    others = [n for n in source.names if n.startswith("attention_interface_") and n != label]
    assert others, "the get_interface assignment shares the name: the lookup must tell them apart"
