"""Each head's mean output over a reference set: what mean ablation puts in its place.

Zeroing a head moves the residual stream somewhere the model never saw; replacing the
head's output by its average keeps the stream on its usual scale and removes only what
the head says *about this input* (the usual "mean ablation"). The average is over every
real (non-padding) token of every reference sample, image and text tokens alike: one
(head_dim,) vector per head, applied at every position, as the edit is.

Read where the edit happens, at the input of ``o_proj`` (``mechhi.trace.sites``).

>>> means = head_means(model, adapter, samples[:40])       # doctest: +SKIP
>>> means.sel(layer=3, head=1).shape                        # doctest: +SKIP
(32,)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import nnsight
import numpy as np
import torch
import xarray as xr

from mechhi.models import VLMAdapter
from mechhi.store import relative_depth
from mechhi.trace.sites import DecoderTracer, output_projections


def head_means(
    model: torch.nn.Module,
    adapter: VLMAdapter,
    samples: Sequence[Any],
    *,
    template: str = "caption",
    batch_size: int = 8,
) -> xr.DataArray:
    """(layer, head, head_dim) float32: each head's output averaged over every real token
    of ``samples`` (prompted with ``template``)."""
    if not samples:
        raise ValueError("head_means: the reference set is empty")
    tracer = DecoderTracer(model, adapter)
    projections = output_projections(tracer.nn, adapter)
    total: torch.Tensor | None = None  # (L, heads * head_dim), float64 sums
    count = 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = adapter.prepare(
            [s.image(adapter) for s in chunk], [s.description for s in chunk], template=template
        )
        batch = batch.to(tracer.device, tracer.dtype)
        real = batch.inputs["attention_mask"].to(torch.float64)[..., None]  # (B, T, 1)
        with torch.inference_mode(), tracer.nn.trace(**batch.inputs) as trace:
            sums = nnsight.save([])
            for projection in projections:
                sums.append(
                    (projection.input.to(torch.float64) * real).sum((0, 1)).cpu()
                )  # (heads * head_dim,)
            trace.stop()
        part = torch.stack(list(sums))  # (L, heads * head_dim)
        total = part if total is None else total + part
        count += int(real.sum())
    assert total is not None
    values = (
        (total / count).reshape(len(projections), adapter.n_heads, -1).float().numpy()
    )  # (L, H, head_dim)
    return xr.DataArray(
        values,
        dims=("layer", "head", "head_dim"),
        coords={
            "layer": np.arange(values.shape[0]),
            "head": np.arange(values.shape[1]),
            "depth": ("layer", relative_depth(values.shape[0])),
        },
        name="head_mean",
        attrs={"samples": len(samples), "tokens": count, "template": template},
    )
