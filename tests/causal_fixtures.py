"""Shared pieces of the causal-check tests: the bundled toy model, a small store traced
from it, held-out scenes, and a plain-model reference that edits heads with forward
pre-hooks (no nnsight)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import pytest
import torch

from mechhi.bundled import BUNDLED_MODEL
from mechhi.toyworld.model import HELD_OUT_SEED
from tests.test_head_outputs import _projections

STORE_SAMPLES = 12


@pytest.fixture(scope="module")
def toy_model():
    from mechhi.models.loading import load

    return load(BUNDLED_MODEL, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def toy_store(toy_model, tmp_path_factory):
    """The bundled trace set's first samples, traced by the bundled model and scored."""
    from mechhi.trace.job import TraceConfig, trace_dataset
    from probes.head_impact import score_store

    path = tmp_path_factory.mktemp("store") / "toy.zarr"
    trace_dataset(TraceConfig(store=str(path), limit=STORE_SAMPLES, device="cpu"), progress=False, loaded=toy_model)
    score_store(path)
    return path


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    from mechhi.toyworld.world import build_synthetic

    return build_synthetic(tmp_path_factory.mktemp("held-out") / "data", n_images=8, seed=HELD_OUT_SEED,
                           splits={"test": 1.0}, progress=False)  # fmt: skip


@contextmanager
def hooked(model, adapter, edits: dict[tuple[int, int], Callable[[torch.Tensor], torch.Tensor]]):
    """The plain model with each (layer, head)'s columns of o_proj's input replaced by ``f(columns)``."""
    projections = _projections(model, adapter)
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
