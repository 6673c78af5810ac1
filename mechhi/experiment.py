"""Evaluate a model (with or without a LoRA adapter) and run the paper's whole comparison.

Two commands live here because they share one evaluation path:

- `run_evaluate` (`mechhi evaluate`): perplexity over answer tokens, closed-ended VQA
  accuracy and AnsProb, optional greedy captions, on one split of a dataset, for the base
  model or the base model plus a saved adapter;
- `run_experiment` (`mechhi experiment`): fine-tunes original / top-K / bottom-K /
  random-K (several seeds) / full from one store's ranking, evaluates each through the
  *saved* adapter directory (so what is measured is what was shipped), and writes the
  paper's Table 4 (metric x setup) and Table 5 (trainable parameters) as JSON and CSV.

A number is only worth reporting if the model that produced it carried a trained
adapter. So every evaluated adapter is audited: the norm of its lora_B weights (zero at
initialisation: zero norm = never trained or never loaded), the decoder layers that
carry LoRA, and the largest change of the answer logits on a fixed probe batch when
the adapter is switched off (zero = the adapter does nothing). The report flags any
setup that fails.

VQA options: one true description and three drawn (seeded) from other samples' descriptions
that describe no object of the same image, so a "false" option is never true.

>>> report = run_experiment(ExperimentConfig(store="stores/toy.zarr"))  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.format import Sample
from .evaluate import Metric, VQAItem, _logits, answer_scores, closed_vqa, perplexity_of
from .finetune import (
    FinetuneConfig,
    LoraSettings,
    TrainSettings,
    finetune,
    head_impact_fingerprint,
    load_split,
    lora_layers_of,
    lora_module_names,
    lora_norms,
    parameter_counts,
    prepare_samples,
    quiet_peft,
    read_selection,
    resolve_dataset,
    resolve_model_id,
    select_layers,
)
from .models import VLMAdapter

METRICS = {  # name -> (label in the tables, higher is better)
    "vqa_accuracy": ("Accuracy ↑", True),
    "ans_prob": ("AnsProb ↑", True),
    "perplexity": ("Perplexity ↓", False),
}


# ============================================================================ evaluation


@dataclass(frozen=True)
class EvalSettings:
    """How much to evaluate. Defaults take well under a minute per setup for the toy model."""

    limit: int | None = 200  # samples of the split (None: all)
    batch_size: int = 16
    vqa_seed: int = 0  # draws the distractor options and the true option's letter
    generate: int = 3  # greedy captions for the first N samples (0: none)
    max_new_tokens: int = 12
    probe_size: int = 4  # samples in the audit's fixed probe batch


def vqa_items(
    samples: Sequence[Sample], images: Sequence[Any], *, seed: int, pool: Sequence[str] | None = None
) -> list[VQAItem]:
    """One 4-option question per sample: its description and three descriptions drawn from
    ``pool`` (default: the samples' own) that name no object of its own image, in a
    seeded random order."""
    rng = np.random.default_rng(seed)
    pool_all = sorted(set(pool) if pool is not None else {s.description for s in samples})
    items = []
    for sample, image in zip(samples, images):
        present = {o.description for o in sample.record.objects}
        pool = [d for d in pool_all if d not in present]
        if len(pool) < 3:
            raise ValueError(f"VQA for sample {sample.index}: only {len(pool)} other descriptions to draw 3 distractors from")
        options = [pool[i] for i in rng.choice(len(pool), size=3, replace=False)]
        answer = int(rng.integers(4))
        options.insert(answer, sample.description)
        items.append(VQAItem(image=image, options=tuple(options), answer=answer))  # type: ignore[arg-type]
    return items


def generate_captions(model: torch.nn.Module, adapter: VLMAdapter, samples: Sequence[Sample], *,
                      max_new_tokens: int, template: str = "caption") -> list[dict[str, str]]:  # fmt: skip
    """Greedy continuation of the prompt up to where the answer starts, one sample at a time."""
    device = next(model.parameters()).device
    out = []
    for sample in samples:
        batch = adapter.prepare([sample.image()], [sample.description], template=template)
        start = int(batch.layouts[0].query_positions[0])
        length = batch.inputs["input_ids"].shape[1]
        prefix = {k: v[:, :start] if v.ndim >= 2 and tuple(v.shape[:2]) == (1, length) else v
                  for k, v in batch.inputs.items()}  # per-token tensors cut before the answer
        dtype = model.get_input_embeddings().weight.dtype
        prefix = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in prefix.items()}
        with torch.no_grad():
            ids = model.generate(**prefix, max_new_tokens=max_new_tokens, do_sample=False)
        text = adapter.tokenizer.decode(ids[0, start:], skip_special_tokens=True).strip()
        out.append({"image_id": sample.image_id, "reference": sample.description, "generated": text})
    return out


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


# ============================================================================ audit


def _answer_logits(model: torch.nn.Module, adapter: VLMAdapter, samples: Sequence[Sample], template: str) -> torch.Tensor:
    """(n_answer_tokens_total, vocab) logits predicting each probe sample's answer tokens."""
    batch = prepare_samples(adapter, samples, template)
    logits = _logits(model, batch)  # (B, T, vocab)
    return torch.cat([logits[i, torch.as_tensor(lay.query_positions) - 1] for i, lay in enumerate(batch.layouts)])


def probe_shift(model: torch.nn.Module, adapter: VLMAdapter, probe: Sequence[Sample], template: str = "caption") -> float | None:
    """Largest |logit change| on the probe batch when the adapter is switched off (None: no peft model)."""
    if not hasattr(model, "disable_adapter"):
        return None
    with_adapter = _answer_logits(model, adapter, probe, template)
    with model.disable_adapter():
        without = _answer_logits(model, adapter, probe, template)
    return float((with_adapter - without).abs().max())


def audit_adapter(
    model: torch.nn.Module,
    adapter: VLMAdapter,
    probe: Sequence[Sample],
    *,
    expected_layers: Sequence[int] | None = None,
    template: str = "caption",
) -> dict[str, Any]:
    """Is the evaluated model really the fine-tuned one? Norms, LoRA layers, probe shift, flags.

    A trained adapter has lora_B != 0 and changes the probe logits; exact zero is the
    test because with lora_B = 0 peft adds exact zeros to the base outputs.
    """
    names = lora_module_names(model) if hasattr(model, "peft_config") else []
    layers = sorted(lora_layers_of(names, adapter)) if names else []
    norms = lora_norms(model)
    shift = probe_shift(model, adapter, probe, template) if names else None
    flags = []
    if not names:
        flags.append("not loaded: the model carries no LoRA modules")
    elif norms["lora_B"] == 0.0:
        flags.append("untrained: every lora_B weight is zero")
    if shift is not None and shift == 0.0:
        flags.append("inactive: the adapter does not change the outputs on the probe batch")
    if expected_layers is not None and names and layers != sorted(expected_layers):
        flags.append(f"wrong layers: LoRA on {layers}, expected {sorted(expected_layers)}")
    return {"lora_layers": layers, "lora_modules": len(names), "lora_A_norm": norms["lora_A"],
            "lora_B_norm": norms["lora_B"], "probe_max_abs_logit_shift": shift, "flags": flags}  # fmt: skip


def load_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> Any:
    """The base model with a saved peft adapter loaded onto it (``.unload()`` gives the base back)."""
    from peft import PeftModel

    read_selection(adapter_dir)  # fails clearly on a directory mechhi did not write
    with quiet_peft():
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).eval()


# ============================================================================ `mechhi evaluate`


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
        from .models.loading import load

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


def parameter_counts_loaded(model: torch.nn.Module) -> dict[str, float]:
    """Table 5 counts for a loaded adapter: LoRA parameters count as trainable."""
    counts = parameter_counts(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    return {**counts, "trainable": lora, "trainable_pct": 100.0 * lora / max(counts["total"], 1)}


# ============================================================================ `mechhi experiment`


@dataclass(frozen=True)
class ExperimentConfig:
    """Defaults of `mechhi experiment`: the paper's Table 4 / 5 comparison on the bundled toy
    model, sized to finish in about 5 minutes on 2 CPU cores."""

    store: str = "stores/toy.zarr"  # scored store whose Head Impact ranking picks the layers
    model: str | None = None  # base model (default: the store's `model` attr)
    dataset: str | None = None  # train/val/test dataset (default: toy fine-tuning dataset, built on first use)
    out: str = "experiments/toy"  # adapters, results.json, table4.csv, table5.csv, audit.csv
    # K layers per setup. 3, not the paper's 4: the toy has 12 layers, and with K=4 the
    # random-4 pool (layers in neither top-4 nor bottom-4) holds exactly 4, so every seed
    # would draw the same layers. random-K needs at least 3K ranked layers.
    k: int = 3
    random_seeds: tuple[int, ...] = (0, 1, 2)  # one random-K setup per seed: mean and spread
    setups: tuple[str, ...] = ("original", "top", "bottom", "random", "full")
    split: str = "test"  # evaluation split
    template: str = "caption"
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16
    threads: int | None = None  # torch CPU threads (None: torch's default; 1 is fastest on a busy machine)
    lora: LoraSettings = LoraSettings()
    train: TrainSettings = TrainSettings()
    eval: EvalSettings = EvalSettings()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.setups) - {"original", "top", "bottom", "random", "full"})
        if unknown:
            raise ValueError(f"ExperimentConfig.setups: unknown {unknown}; choose original, top, bottom, random, full")
        if "random" in self.setups and not self.random_seeds:
            raise ValueError("ExperimentConfig.random_seeds is empty but the random setup is asked for")


@dataclass(frozen=True)
class Setup:
    name: str  # e.g. "top-3", "random-3 (seed 1)"
    group: str  # the Table 4 column: "original", "top-3", "random-3", "full"
    spec: str | None  # layer selection spec (None: original)
    seed: int = 0

    @property
    def dirname(self) -> str:
        return self.name.replace(" (seed ", "-seed").replace(")", "")


def plan(config: ExperimentConfig) -> list[Setup]:
    """The setups to run, in table order."""
    k, out = config.k, []
    for kind in config.setups:
        if kind == "original":
            out.append(Setup("original", "original", None))
        elif kind == "full":
            out.append(Setup("full", "full", "full"))
        elif kind == "random":
            out += [Setup(f"random-{k} (seed {s})", f"random-{k}", f"random-{k}", s) for s in config.random_seeds]
        else:
            out.append(Setup(f"{kind}-{k}", f"{kind}-{k}", f"{kind}-{k}"))
    return out


def _setup_key(config: ExperimentConfig, setup: Setup, ranking: str | None) -> str:
    """Fingerprint of everything a setup's row depends on (config less paths, store ranking)."""
    fields = {k: v for k, v in asdict(config).items() if k not in ("out", "device", "threads", "setups", "random_seeds")}
    fields.update(setup=setup.name, seed=setup.seed, ranking=ranking)
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _run_setup(config: ExperimentConfig, setup: Setup, loaded, model_id: str, data_dir: Path, test, progress: bool) -> dict:
    """Fine-tune (unless original), then evaluate and audit through the saved adapter."""
    model, adapter = loaded
    out = Path(config.out) / "adapters" / setup.dirname
    entry: dict[str, Any] = {"name": setup.name, "group": setup.group, "spec": setup.spec, "seed": setup.seed}
    began = time.time()
    if setup.spec is None:
        entry.update(layers=[], params={**parameter_counts(model), "trainable": 0, "trainable_pct": 0.0})
        entry["metrics"] = evaluate_model(model, adapter, test, settings=config.eval, template=config.template)
        entry["seconds"] = time.time() - began
        return entry
    ft = FinetuneConfig(store=config.store, select=setup.spec, out=str(out), dataset=str(data_dir), model=model_id,
                        select_seed=setup.seed, template=config.template, device=config.device, dtype=config.dtype,
                        lora=config.lora, train=config.train)  # fmt: skip
    result = finetune(ft, progress=progress, loaded=loaded)
    entry.update(layers=list(result.selection.layers), params=result.params, adapter=str(out),
                 provenance={k: v for k, v in result.selection.provenance.items() if k != "ranking"},
                 training={"loss_curve": [(r["step"], r["loss"]) for r in result.history.train],
                           "val_curve": [(r["step"], r["loss"]) for r in result.history.val],
                           "best_step": result.history.best_step, "best_val_loss": result.history.best_loss,
                           "stopped_early": result.history.stopped_early, "seconds": result.history.seconds})  # fmt: skip
    evaluated = evaluate_adapter(model, adapter, out, test, settings=config.eval, template=config.template,
                                 expected_layers=result.selection.layers)  # fmt: skip
    entry.update(metrics=evaluated["metrics"], audit=evaluated["audit"])  # params: from training, above
    entry["seconds"] = time.time() - began
    return entry


def run_experiment(
    config: ExperimentConfig, *, progress: bool = True, loaded: tuple[Any, VLMAdapter] | None = None
) -> dict[str, Any]:
    """Train and evaluate every setup, print Tables 4 and 5 and the audit, write JSON + CSV.

    Rerunning resumes: finished adapters are not retrained and finished evaluations
    (``<out>/setups/<setup>.json``, keyed by the settings) are not redone.
    """
    from .store import open_store

    if config.threads:
        torch.set_num_threads(config.threads)
    store_ds = open_store(config.store)
    setups = plan(config)
    for setup in setups:  # fail before any training on a store without head_impact or too few layers
        if setup.spec is not None:
            select_layers(store_ds, setup.spec, seed=setup.seed)
    model_id = resolve_model_id(config.model, store_ds)
    if loaded is None:
        from .models.loading import load

        loaded = load(model_id, device=config.device, dtype=config.dtype)
    data_dir = resolve_dataset(config.dataset, progress=progress)
    test = load_split(data_dir, config.split)
    ranking = head_impact_fingerprint(store_ds["head_impact"]) if "head_impact" in store_ds.data_vars else None
    out = Path(config.out)
    (out / "setups").mkdir(parents=True, exist_ok=True)
    entries = []
    for setup in setups:
        cache = out / "setups" / f"{setup.dirname}.json"
        key = _setup_key(replace(config, model=model_id, dataset=str(data_dir)), setup, ranking)
        cached = json.loads(cache.read_text()) if cache.is_file() else {}
        if cached.get("key") == key:
            entries.append(cached["entry"])
            continue
        if progress:
            print(f"[{len(entries) + 1}/{len(setups)}] {setup.name}")
        entry = _run_setup(config, setup, loaded, model_id, data_dir, test, progress)
        cache.write_text(json.dumps({"key": key, "entry": entry}, default=str) + "\n")
        entries.append(entry)
    report = build_report(config, model_id, str(data_dir), entries)
    write_report(report, out)
    if progress:
        print_report(report)
    return report


# ============================================================================ tables


def _group_value(entries: list[dict], metric: str) -> dict[str, Any]:
    """One Table 4 cell: a setup's mean ± se, or over seeds: mean of means, mean se, sd of means."""
    means = [e["metrics"][metric]["mean"] for e in entries]
    ses = [e["metrics"][metric]["se"] for e in entries]
    cell = {"mean": float(np.mean(means)), "se": float(np.mean(ses)), "n_seeds": len(entries)}
    cell["spread_sd"] = float(np.std(means, ddof=1)) if len(entries) > 1 else None
    return cell


def table4(entries: list[dict]) -> list[dict[str, Any]]:
    """Rows: metrics; per setup group its cell, the shift from original, and which shift is largest."""
    groups: dict[str, list[dict]] = {}
    for e in entries:
        groups.setdefault(e["group"], []).append(e)
    rows = []
    for metric, (label, higher) in METRICS.items():
        cells = {g: _group_value(es, metric) for g, es in groups.items()}
        base = cells.get("original")
        if base is not None:
            for g, cell in cells.items():
                cell["shift"] = cell["mean"] - base["mean"]
            others = {g: abs(c["shift"]) for g, c in cells.items() if g != "original"}
            largest = max(others, key=others.get) if others else None
        else:
            largest = None
        rows.append({"metric": metric, "label": label, "higher_is_better": higher, "cells": cells,
                     "largest_shift": largest})  # fmt: skip
    return rows


def table5(entries: list[dict]) -> list[dict[str, Any]]:
    return [{"setup": e["name"], "layers": e["layers"], "total": int(e["params"]["total"]),
             "trainable": int(e["params"]["trainable"]), "trainable_pct": e["params"]["trainable_pct"]}
            for e in entries]  # fmt: skip


def audit_rows(entries: list[dict]) -> list[dict[str, Any]]:
    rows = []
    for e in entries:
        if e["spec"] is None:
            continue
        a, t = e["audit"], e["training"]
        rows.append({"setup": e["name"], "layers": e["layers"], "steps": len(t["loss_curve"]),
                     "first_loss": t["loss_curve"][0][1] if t["loss_curve"] else None,
                     "last_loss": t["loss_curve"][-1][1] if t["loss_curve"] else None,
                     "best_step": t["best_step"], "best_val_loss": t["best_val_loss"],
                     "stopped_early": t["stopped_early"], "lora_B_norm": a["lora_B_norm"],
                     "probe_shift": a["probe_max_abs_logit_shift"], "flags": a["flags"]})  # fmt: skip
    return rows


def build_report(config: ExperimentConfig, model_id: str, dataset: str, entries: list[dict]) -> dict[str, Any]:
    audits = audit_rows(entries)
    flagged = {r["setup"]: r["flags"] for r in audits if r["flags"]}
    randoms = [tuple(e["layers"]) for e in entries if e["group"].startswith("random")]
    notes = ["random seeds drew identical layer sets"] if len(set(randoms)) < len(randoms) else []
    return {"config": json.loads(json.dumps(asdict(config), default=str)), "model": model_id, "dataset": dataset,
            "setups": entries, "table4": table4(entries), "table5": table5(entries), "audit": audits,
            "flagged": flagged, "notes": notes}  # fmt: skip


def write_report(report: dict[str, Any], out: Path) -> None:
    """results.json (everything), table4.csv, table5.csv, audit.csv."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    with open(out / "table4.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["metric", "setup", "mean", "se", "spread_sd", "n_seeds", "shift_from_original", "largest_shift"])
        for row in report["table4"]:
            for g, c in row["cells"].items():
                w.writerow([row["metric"], g, c["mean"], c["se"], c["spread_sd"], c["n_seeds"], c.get("shift"),
                            g == row["largest_shift"]])  # fmt: skip
    with open(out / "table5.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setup", "layers", "total", "trainable", "trainable_pct"])
        for r in report["table5"]:
            w.writerow([r["setup"], " ".join(map(str, r["layers"])), r["total"], r["trainable"], r["trainable_pct"]])
    with open(out / "audit.csv", "w", newline="") as f:
        w = csv.writer(f)
        keys = ["setup", "layers", "steps", "first_loss", "last_loss", "best_step", "best_val_loss", "stopped_early",
                "lora_B_norm", "probe_shift", "flags"]  # fmt: skip
        w.writerow(keys)
        for r in report["audit"]:
            w.writerow([" ".join(map(str, r[k])) if k == "layers" else "; ".join(r[k]) if k == "flags" else r[k]
                        for k in keys])  # fmt: skip


def _cell_text(cell: dict[str, Any]) -> str:
    text = f"{cell['mean']:.4g} ± {cell['se']:.2g}"
    if cell.get("spread_sd") is not None:
        text += f" (sd {cell['spread_sd']:.2g}, {cell['n_seeds']} seeds)"
    return text


def print_report(report: dict[str, Any]) -> None:
    """Table 4 (largest shift from original in bold), Table 5, and the audit with its flags."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    groups = list(report["table4"][0]["cells"]) if report["table4"] else []
    t4 = Table(title="Table 4: metrics on the test split (bold: largest shift from original)")
    for name in ["metric", *groups]:
        t4.add_column(name, justify="right")
    for row in report["table4"]:
        texts = [_cell_text(row["cells"][g]) for g in groups]
        texts = [f"[bold]{t}[/bold]" if g == row["largest_shift"] else t for g, t in zip(groups, texts)]
        t4.add_row(row["label"], *texts)
    console.print(t4)
    t5 = Table(title="Table 5: trainable parameters")
    for name in ("setup", "layers", "total, #", "trainable, #", "trainable, %"):
        t5.add_column(name, justify="right")
    for r in report["table5"]:
        t5.add_row(r["setup"], ",".join(map(str, r["layers"])), f"{r['total']:,}", f"{r['trainable']:,}",
                   f"{r['trainable_pct']:.4f}")  # fmt: skip
    console.print(t5)
    ta = Table(title="Audit: did each evaluated model carry its trained adapter?")
    for name in ("setup", "loss first→last", "best val (step)", "‖lora_B‖", "probe shift", "flags"):
        ta.add_column(name)
    for r in report["audit"]:
        flags = "[red]" + "; ".join(r["flags"]) + "[/red]" if r["flags"] else "ok"
        ta.add_row(r["setup"], f"{r['first_loss']:.3f}→{r['last_loss']:.3f}", f"{r['best_val_loss']:.3f} ({r['best_step']})",
                   f"{r['lora_B_norm']:.3g}", f"{r['probe_shift']:.3g}" if r["probe_shift"] is not None else "-", flags)  # fmt: skip
    console.print(ta)
    for note in report["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")
