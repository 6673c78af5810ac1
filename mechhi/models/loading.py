"""Load a model and its processor by HF id or local directory, and pick its adapter.

The family is found from the config (``model_type``), never from the name, so a
fine-tuned or renamed checkpoint of a supported architecture just works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import adapter_class
from ._common import AdapterError, VLMAdapter


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AdapterError(f"--device {device} asked for, but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 where the GPU supports it, else float32 (CPU bf16 is slow and lossy)."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise AdapterError(f"unknown dtype {dtype!r}; choose auto, {', '.join(table)}")
    return table[dtype]


def load(
    model_id: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    attn_implementation: str | None = None,
) -> tuple[Any, VLMAdapter]:
    """(model in eval mode on ``device``, its adapter).

    >>> model, adapter = load("Qwen/Qwen2-VL-2B-Instruct")            # doctest: +SKIP
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    source = str(model_id)
    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as error:
        hint = "" if Path(source).exists() else " (not a local directory; hub downloads need network access)"
        raise AdapterError(f"cannot load model config from {source!r}{hint}: {error}".splitlines()[0]) from None
    family = adapter_class(config)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    processor = AutoProcessor.from_pretrained(source, revision=revision)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "revision": revision}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(source, **kwargs).to(torch_device).eval()
    return model, family(model.config, processor)
