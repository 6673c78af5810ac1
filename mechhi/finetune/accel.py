"""Where training runs, decided by accelerate: device, processes, mixed precision,
gradient accumulation. The same `mechhi finetune` runs on one CPU, one GPU, or several
processes under ``accelerate launch`` / ``torchrun`` (DDP: NCCL on GPUs, gloo on CPUs).

accelerate keeps one process-wide state: the first `Accelerator` of a process fixes
the device and mixed precision for all later ones (`mechhi experiment` makes one per
setup, always with the same settings). On a machine without a GPU the accelerator is
asked for CPU, which is also what lets several launched processes meet over gloo
(``accelerate launch --multi_gpu --num_processes 2``; accelerate's ``--cpu`` flag alone
starts a single process).
"""

from __future__ import annotations

import os

import torch


def mixed_precision(setting: str, device: str) -> str | None:
    """accelerate's ``mixed_precision`` for a setting: ``auto`` is bf16 on a CUDA device that
    has it, else none (CPU autocast is slow), unless ``accelerate launch`` chose one."""
    if setting != "auto":
        return setting
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None  # `accelerate launch --mixed_precision ...` decides
    cuda = device != "cpu" and torch.cuda.is_available()
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(*, device: str = "auto", precision: str = "auto", grad_accum: int = 1):
    """The run's `accelerate.Accelerator`. ``device`` auto | cpu | cuda | cuda:N (the last
    only in a single process: launched ranks each get their own GPU)."""
    from accelerate import Accelerator
    from accelerate.state import is_initialized

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device} asked for, but no CUDA device is available")
        if ":" in device and int(os.environ.get("WORLD_SIZE", "1")) == 1 and not is_initialized():
            torch.cuda.set_device(torch.device(device))  # accelerate then places on the current device
    cpu = device == "cpu" or not torch.cuda.is_available()
    return Accelerator(
        cpu=cpu, mixed_precision=mixed_precision(precision, device), gradient_accumulation_steps=grad_accum
    )
