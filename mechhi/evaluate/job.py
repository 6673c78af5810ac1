"""`mechhi evaluate`: perplexity over answer tokens, closed-ended VQA accuracy and AnsProb,
optional greedy captions, on one split, for the base model or base + a saved adapter."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.format import Sample
from ..finetune import (
    load_split,
    read_selection,
    resolve_dataset,
    resolve_model_id,
)
from ..models import VLMAdapter
from .audit import audit_adapter, load_adapter, parameter_counts_loaded
from .generate import generate_captions
from .metrics import Metric, answer_scores, closed_vqa, perplexity_of
from .vqa import vqa_items


@dataclass(frozen=True)
class EvalSettings:
    """How much to evaluate. Defaults take well under a minute per setup for the toy model."""

    limit: int | None = 200  # samples of the split (None: all)
    batch_size: int = 16
    vqa_seed: int = 0  # draws the distractor options and the true option's letter
    generate: int = 3  # greedy captions for the first N samples (0: none)
    max_new_tokens: int = 12
    probe_size: int = 4  # samples in the audit's fixed probe batch


def evaluate_model(
    model: torch.nn.Module,
    adapter: VLMAdapter,
    dataset_split: Sequence[Sample],
    *,
    settings: EvalSettings = EvalSettings(),
    template: str = "caption",
) -> dict[str, Any]:
    """Perplexity (eq. 3) and answer-token accuracy, VQA accuracy and AnsProb, each with its
    standard error, plus optional greedy captions: a JSON-able dict.

    >>> evaluate_model(model, adapter, load_dataset("data/toy-finetune", split="test"))  # doctest: +SKIP
    {'n': 200, 'perplexity': {'mean': 3.1, 'se': 0.1, 'n': 200}, ...}
    """
    samples = list(dataset_split)[: settings.limit] if settings.limit else list(dataset_split)
    if not samples:
        raise ValueError("evaluate_model: the dataset split is empty")
    images = [s.image() for s in samples]
    nll, accuracy = answer_scores(model, adapter, images, [s.description for s in samples],
                                  template=template, batch_size=settings.batch_size)  # fmt: skip
    pool = [s.description for s in dataset_split]  # distractors from the whole split, not just the limit
    items = vqa_items(samples, images, seed=settings.vqa_seed, pool=pool)
    vqa = closed_vqa(model, adapter, items, batch_size=settings.batch_size)
    result: dict[str, Any] = {
        "n": len(samples),
        "perplexity": perplexity_of(nll).as_dict(),
        "answer_nll": Metric.of(nll).as_dict(),
        "token_accuracy": Metric.of(accuracy).as_dict(),
        "vqa_accuracy": vqa["accuracy"].as_dict(),
        "ans_prob": vqa["ans_prob"].as_dict(),
    }
    if settings.generate:
        result["generations"] = generate_captions(model, adapter, samples[: settings.generate],
                                                  max_new_tokens=settings.max_new_tokens, template=template)  # fmt: skip
    return result


@dataclass(frozen=True)
class EvaluateConfig:
    """Defaults of `mechhi evaluate`: the bundled toy model on the toy fine-tuning test split."""

    model: str | None = None  # base model (default: the adapter's base model, else the bundled toy)
    adapter: str | None = None  # directory written by `mechhi finetune` (None: the base model alone)
    dataset: str | None = None  # mechhi-format dataset (default: toy fine-tuning dataset, built on first use)
    split: str = "test"
    template: str = "caption"
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16
    threads: int | None = None  # torch CPU threads (None: torch's default; 1 is fastest on a busy machine)
    eval: EvalSettings = EvalSettings()


def run_evaluate(
    config: EvaluateConfig, *, progress: bool = True, loaded: tuple[Any, VLMAdapter] | None = None
) -> dict[str, Any]:
    """Evaluate the base model or base + adapter; JSON-able result with metrics and audit."""
    if config.threads:
        torch.set_num_threads(config.threads)
    meta = read_selection(config.adapter) if config.adapter else None
    model_id = config.model or (meta["base_model"] if meta else resolve_model_id(None, None))
    if loaded is None:
        from ..models.loading import load

        loaded = load(model_id, device=config.device, dtype=config.dtype)
    model, adapter = loaded
    data_dir = resolve_dataset(config.dataset, progress=progress)
    split = load_split(data_dir, config.split)
    result: dict[str, Any] = {"model": model_id, "adapter": config.adapter, "dataset": str(data_dir),
                              "split": config.split, "settings": asdict(config.eval)}  # fmt: skip
    if meta and str(meta["base_model"]) != str(model_id):
        result["warning"] = f"the adapter was trained on {meta['base_model']!r}, evaluated on {model_id!r}"
    if config.adapter is None:
        result["metrics"] = evaluate_model(model, adapter, split, settings=config.eval, template=config.template)
        return result
    result.update(evaluate_adapter(model, adapter, config.adapter, split, settings=config.eval, template=config.template,
                                   expected_layers=meta["selection"]["layers"]))  # fmt: skip
    return result


def evaluate_adapter(
    model: torch.nn.Module, adapter: VLMAdapter, adapter_dir: str | Path, split: Any, *, settings: EvalSettings,
    template: str, expected_layers: Sequence[int],
) -> dict[str, Any]:
    """Metrics, audit and parameter counts of ``model`` carrying the saved adapter; the
    adapter is unloaded again afterwards, so ``model`` is left as it was given."""
    peft_model = load_adapter(model, adapter_dir)
    try:
        return {
            "metrics": evaluate_model(peft_model, adapter, split, settings=settings, template=template),
            "audit": audit_adapter(peft_model, adapter, split.samples[: settings.probe_size],
                                   expected_layers=expected_layers, template=template),
            "params": parameter_counts_loaded(peft_model),
        }  # fmt: skip
    finally:
        peft_model.unload()
