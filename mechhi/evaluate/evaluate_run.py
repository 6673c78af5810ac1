"""`mechhi evaluate`: perplexity over answer tokens, closed-ended VQA accuracy and AnsProb,
optional greedy captions, on one split, for the base model or base + a saved adapter.

An adapter is evaluated on the base model it was trained on: another model of the same
shape is refused unless ``force`` (then the result says so in ``warning``), and one of
another shape is refused with the module that does not fit (`mechhi.evaluate.compat`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mechhi.data.format import Sample
from mechhi.data.splits import load_split
from mechhi.evaluate.audit import audit_adapter, load_adapter, parameter_counts_loaded
from mechhi.evaluate.compat import AdapterMismatch, same_base
from mechhi.evaluate.generate import generate_captions
from mechhi.evaluate.metrics import Metric, perplexity_of, predictions_of, scores_of, vqa_scores_of
from mechhi.evaluate.prepared import EvalSet, EvalSettings
from mechhi.finetune import read_selection, resolve_dataset, resolve_model_id
from mechhi.models import VLMAdapter
from mechhi.models.loading import load


def evaluate_model(
    model: torch.nn.Module,
    adapter: VLMAdapter,
    dataset_split: Sequence[Sample],
    *,
    settings: EvalSettings = EvalSettings(),
    template: str = "caption",
    prepared: EvalSet | None = None,
) -> dict[str, Any]:
    """Perplexity (eq. 3) and answer-token accuracy, VQA accuracy and AnsProb, each with its
    standard error, plus optional greedy captions: a JSON-able dict. ``prepared``: the
    split's inputs already built (`EvalSet.build` of this split and settings).

    >>> evaluate_model(model, adapter, load_dataset("data/toy-finetune", split="test"))  # doctest: +SKIP
    {'n': 200, 'perplexity': {'mean': 3.1, 'se': 0.1, 'n': 200}, ...}
    """
    inputs = prepared or EvalSet.build(adapter, dataset_split, settings, template=template)
    nll, accuracy = scores_of(predictions_of(model, inputs.captions))
    correct, probability = vqa_scores_of(model, inputs.letters, inputs.questions, inputs.answers)
    result: dict[str, Any] = {
        "n": len(inputs.samples),
        "perplexity": perplexity_of(nll).as_dict(),
        "answer_nll": Metric.of(nll).as_dict(),
        "token_accuracy": Metric.of(accuracy).as_dict(),
        "vqa_accuracy": Metric.of(correct).as_dict(),
        "ans_prob": Metric.of(probability).as_dict(),
    }
    if settings.generate:
        result["generations"] = generate_captions(
            model,
            adapter,
            inputs.samples[: settings.generate],
            max_new_tokens=settings.max_new_tokens,
            template=template,
            images=inputs.images,
        )
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
    device_map: str | None = (
        None  # accelerate placement over several devices ("auto", ...); device stays "auto"
    )
    threads: int | None = None  # torch CPU threads (None: torch's default; 1 is fastest on a busy machine)
    force: bool = False  # evaluate an adapter on a base model other than the one it was trained on
    eval: EvalSettings = EvalSettings()


def run_evaluate(
    config: EvaluateConfig, *, progress: bool = True, loaded: tuple[Any, VLMAdapter] | None = None
) -> dict[str, Any]:
    """Evaluate the base model or base + adapter; JSON-able result with metrics and audit."""
    if config.threads:
        torch.set_num_threads(config.threads)
    meta = read_selection(config.adapter) if config.adapter else None
    model_id = config.model or (meta["base_model"] if meta else resolve_model_id(None, None))
    mismatch = meta is not None and not same_base(str(meta["base_model"]), str(model_id))
    if mismatch and not config.force:
        raise AdapterMismatch(
            f"adapter {config.adapter} was trained on {meta['base_model']!r}, not {model_id!r}; "
            "pass --force to evaluate it on this model anyway"
        )
    if loaded is None:
        loaded = load(model_id, device=config.device, dtype=config.dtype, device_map=config.device_map)
    model, adapter = loaded
    data_dir = resolve_dataset(config.dataset, progress=progress)
    split = load_split(data_dir, config.split)
    result: dict[str, Any] = {
        "model": model_id,
        "adapter": config.adapter,
        "dataset": str(data_dir),
        "split": config.split,
        "settings": asdict(config.eval),
    }
    if mismatch:
        result["warning"] = (
            f"the adapter was trained on {meta['base_model']!r}, evaluated on {model_id!r} (--force)"
        )
    prepared = EvalSet.build(adapter, split, config.eval, template=config.template)
    if config.adapter is None:
        result["metrics"] = evaluate_model(
            model, adapter, split, settings=config.eval, template=config.template, prepared=prepared
        )
        return result
    result.update(
        evaluate_adapter(
            model,
            adapter,
            config.adapter,
            split,
            settings=config.eval,
            template=config.template,
            expected_layers=meta["selection"]["layers"],
            prepared=prepared,
            model_name=repr(str(model_id)),
        )
    )
    return result


def evaluate_adapter(
    model: torch.nn.Module,
    adapter: VLMAdapter,
    adapter_dir: str | Path,
    split: Any,
    *,
    settings: EvalSettings,
    template: str,
    expected_layers: Sequence[int],
    prepared: EvalSet | None = None,
    model_name: str = "the model",
) -> dict[str, Any]:
    """Metrics, audit and parameter counts of ``model`` carrying the saved adapter; the
    adapter is unloaded again afterwards, so ``model`` is left as it was given."""
    peft_model = load_adapter(model, adapter_dir, model_name=model_name)
    try:
        return {
            "metrics": evaluate_model(
                peft_model, adapter, split, settings=settings, template=template, prepared=prepared
            ),
            "audit": audit_adapter(
                peft_model,
                adapter,
                list(split)[: settings.probe_size],
                expected_layers=expected_layers,
                template=template,
                images=prepared.images if prepared else None,
            ),
            "params": parameter_counts_loaded(peft_model),
        }
    finally:
        peft_model.unload()
