"""The LoRA surgery, handed to peft: q/k/v of the chosen decoder layers only (never the
vision tower), checked after peft wrapped them; parameter counts and weight norms."""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mechhi.finetune.select import SelectionError
from mechhi.models import AdapterError, VLMAdapter


@dataclass(frozen=True)
class LoraSettings:
    """The paper's LoRA: r=8, alpha=16, no dropout, no bias, on q/k/v only."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0


def lora_config(adapter: VLMAdapter, layers: Sequence[int], settings: LoraSettings = LoraSettings()) -> Any:
    """peft LoraConfig whose string target is a full-match regex over the chosen layers' q/k/v.

    The list form ``["q_proj", "k_proj", "v_proj"]`` would also match the vision
    tower's attention in SigLIP/CLIP towers, so the regex from the adapter is used.
    """
    from peft import LoraConfig

    if not layers:
        raise SelectionError("no layers to put LoRA on")
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        bias="none",
        target_modules=adapter.lora_target_regex(layers),
    )


def lora_module_names(model: torch.nn.Module) -> list[str]:
    """Names (relative to the wrapped base model) of the modules peft put LoRA on."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return sorted(n.removeprefix(prefix) for n, m in model.named_modules() if isinstance(m, LoraLayer))


def lora_layers_of(names: Sequence[str], adapter: VLMAdapter) -> dict[int, list[str]]:
    """{decoder layer: [q, k, v, ...]} from LoRA module names; raises on any name outside
    the decoder's attention (e.g. the vision tower)."""
    pattern = re.compile(
        rf"(?:.*\.)?{re.escape(adapter.decoder_layers)}\.(\d+)\.{re.escape(adapter.attention)}\.(\w+)_proj"
    )
    found: dict[int, list[str]] = {}
    for name in names:
        match = pattern.fullmatch(name)
        if not match:
            raise AdapterError(
                f"LoRA landed on {name!r}, outside {adapter.decoder_layers}.*.{adapter.attention}"
            )
        found.setdefault(int(match.group(1)), []).append(match.group(2))
    return {layer: sorted(p) for layer, p in sorted(found.items())}


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft reads `is_gradient_checkpointing`, which transformers 5 deprecates: a warning per
    wrapped model that says nothing to the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def attach_lora(
    model: torch.nn.Module,
    adapter: VLMAdapter,
    layers: Sequence[int],
    settings: LoraSettings = LoraSettings(),
) -> Any:
    """Wrap ``model`` (in place) with LoRA on q/k/v of ``layers``; check peft did exactly that."""
    from peft import get_peft_model

    with quiet_peft():
        peft_model = get_peft_model(model, lora_config(adapter, layers, settings))
    found = lora_layers_of(lora_module_names(peft_model), adapter)
    wanted = {layer: ["k", "q", "v"] for layer in sorted(set(layers))}
    if found != wanted:
        peft_model.unload()
        raise AdapterError(f"{adapter.family}: LoRA went on {found}, wanted q/k/v of layers {sorted(wanted)}")
    return peft_model


def parameter_counts(model: torch.nn.Module) -> dict[str, float]:
    """Total and trainable parameters, and the trainable percentage (the paper's Table 5)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable, "trainable_pct": 100.0 * trainable / max(total, 1)}


def lora_norms(model: torch.nn.Module) -> dict[str, Any]:
    """Frobenius norms of every lora_A / lora_B matrix and their totals.

    lora_B starts at zero, so a total B norm of 0 means the adapter was never trained
    (or its weights were never loaded).
    """
    per_module: dict[str, dict[str, float]] = {}
    totals = {"A": 0.0, "B": 0.0}
    for name, param in model.named_parameters():
        match = re.search(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])\.", name)
        if not match:
            continue
        norm = float(param.detach().float().norm())
        per_module.setdefault(match.group(1), {})[match.group(2)] = norm
        totals[match.group(2)] += norm**2
    return {"lora_A": math.sqrt(totals["A"]), "lora_B": math.sqrt(totals["B"]), "per_module": per_module}
