"""Greedy captions: the prompt up to where the answer starts, continued by the model."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mechhi.data.format import Sample
from mechhi.finetune import ImageCache
from mechhi.models import VLMAdapter
from mechhi.models.loading import input_device


def generate_captions(
    model: torch.nn.Module,
    adapter: VLMAdapter,
    samples: Sequence[Sample],
    *,
    max_new_tokens: int,
    template: str = "caption",
    images: ImageCache | None = None,
) -> list[dict[str, str]]:
    """Greedy continuation of the prompt up to where the answer starts, one sample at a time
    (images from ``images`` when given)."""
    device = input_device(model)
    out = []
    for sample in samples:
        image = images.image(sample) if images is not None else sample.image()
        batch = adapter.prepare([image], [sample.description], template=template)
        start = int(batch.layouts[0].query_positions[0])
        length = batch.inputs["input_ids"].shape[1]
        prefix = {
            k: v[:, :start] if v.ndim >= 2 and tuple(v.shape[:2]) == (1, length) else v
            for k, v in batch.inputs.items()
        }  # per-token tensors cut before the answer
        dtype = model.get_input_embeddings().weight.dtype
        prefix = {
            k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in prefix.items()
        }
        with torch.no_grad():
            ids = model.generate(**prefix, max_new_tokens=max_new_tokens, do_sample=False)
        text = adapter.tokenizer.decode(ids[0, start:], skip_special_tokens=True).strip()
        out.append({"image_id": sample.image_id, "reference": sample.description, "generated": text})
    return out
