"""Is the evaluated model really the fine-tuned one?

A number is only worth reporting if the model that produced it carried a trained
adapter. So every evaluated adapter is audited: the norm of its lora_B weights (zero at
initialisation: zero norm = never trained or never loaded), the decoder layers that
carry LoRA, and the largest change of the answer logits on a fixed probe batch when
the adapter is switched off (zero = the adapter does nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mechhi.data.format import Sample
from mechhi.evaluate.compat import check_fits
from mechhi.finetune import (
    ImageCache,
    lora_layers_of,
    lora_module_names,
    lora_norms,
    parameter_counts,
    prepare_samples,
    quiet_peft,
    read_selection,
)
from mechhi.finetune.loss import answer_logits
from mechhi.models import VLMAdapter


def _answer_logits(
    model: torch.nn.Module,
    adapter: VLMAdapter,
    samples: Sequence[Sample],
    template: str,
    images: ImageCache | None = None,
) -> torch.Tensor:
    """(n_answer_tokens_total, vocab) logits predicting each probe sample's answer tokens."""
    batch = prepare_samples(adapter, samples, template, images)
    logits = answer_logits(model, batch)  # (B, T, vocab)
    return torch.cat(
        [logits[i, torch.as_tensor(lay.query_positions) - 1] for i, lay in enumerate(batch.layouts)]
    )


def probe_shift(
    model: torch.nn.Module,
    adapter: VLMAdapter,
    probe: Sequence[Sample],
    template: str = "caption",
    images: ImageCache | None = None,
) -> float | None:
    """Largest |logit change| on the probe batch when the adapter is switched off (None: no peft model)."""
    if not hasattr(model, "disable_adapter"):
        return None
    with_adapter = _answer_logits(model, adapter, probe, template, images)
    with model.disable_adapter():
        without = _answer_logits(model, adapter, probe, template, images)
    return float((with_adapter - without).abs().max())


def audit_adapter(
    model: torch.nn.Module,
    adapter: VLMAdapter,
    probe: Sequence[Sample],
    *,
    expected_layers: Sequence[int] | None = None,
    template: str = "caption",
    images: ImageCache | None = None,
) -> dict[str, Any]:
    """Is the evaluated model really the fine-tuned one? Norms, LoRA layers, probe shift, flags.

    A trained adapter has lora_B != 0 and changes the probe logits; exact zero is the
    test because with lora_B = 0 peft adds exact zeros to the base outputs.
    """
    names = lora_module_names(model) if hasattr(model, "peft_config") else []
    layers = sorted(lora_layers_of(names, adapter)) if names else []
    norms = lora_norms(model)
    shift = probe_shift(model, adapter, probe, template, images) if names else None
    flags = []
    if not names:
        flags.append("not loaded: the model carries no LoRA modules")
    elif norms["lora_B"] == 0.0:
        flags.append("untrained: every lora_B weight is zero")
    if shift is not None and shift == 0.0:
        flags.append("inactive: the adapter does not change the outputs on the probe batch")
    if expected_layers is not None and names and layers != sorted(expected_layers):
        flags.append(f"wrong layers: LoRA on {layers}, expected {sorted(expected_layers)}")
    return {
        "lora_layers": layers,
        "lora_modules": len(names),
        "lora_A_norm": norms["lora_A"],
        "lora_B_norm": norms["lora_B"],
        "probe_max_abs_logit_shift": shift,
        "flags": flags,
    }


def load_adapter(model: torch.nn.Module, adapter_dir: str | Path, *, model_name: str = "the model") -> Any:
    """The base model with a saved peft adapter loaded onto it (``.unload()`` gives the base back).

    Fails with one line on a directory mechhi did not write, or an adapter whose LoRA
    modules the model lacks or sizes differently (`compat.check_fits`).
    """
    from peft import PeftModel

    read_selection(adapter_dir)
    check_fits(model, adapter_dir, model_name)
    with quiet_peft():
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).eval()


def parameter_counts_loaded(model: torch.nn.Module) -> dict[str, float]:
    """Table 5 counts for a loaded adapter: LoRA parameters count as trainable."""
    counts = parameter_counts(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    return {**counts, "trainable": lora, "trainable_pct": 100.0 * lora / max(counts["total"], 1)}
