"""Which device and dtype a run uses, from the ``--device`` / ``--dtype`` words.

Every stage that runs a model (trace, grounding, bench, fine-tuning) resolves them the
same way, so this sits below all of them and imports nothing of mechhi.
"""

from __future__ import annotations

import torch

DEVICE_TYPES = ("cpu", "cuda", "mps")


class DeviceError(ValueError):
    """A ``--device`` or ``--dtype`` this machine cannot give; the message says which."""


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA if available, else CPU; otherwise cpu, cuda, cuda:N or mps, checked."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise DeviceError(f"unknown --device {device!r}; choose auto, cpu, cuda, cuda:N or mps")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device} asked for, but no CUDA device is available")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"--device {device} asked for, but MPS is not available")
    return parsed


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 where the GPU supports it, else float32 (CPU bf16 is slow and lossy)."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise DeviceError(f"unknown dtype {dtype!r}; choose auto, {', '.join(table)}")
    return table[dtype]
