"""`mechhi finetune`: select layers from a store, train LoRA on them, save the adapter
with ``mechhi_selection.json`` (layers, provenance, parameter counts) and
``training_log.json`` (loss curves). A rerun resumes; a finished run is returned as is.

>>> result = finetune(FinetuneConfig(store="stores/toy.zarr", select="top-4"))  # doctest: +SKIP
>>> result.layers, result.params["trainable_pct"]                                # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import xarray as xr

from .. import __version__
from ..data.format import KeyObjectDataset
from ..models import VLMAdapter
from .data import ensure_toy_dataset, load_split
from .lora import LoraSettings, attach_lora, lora_norms, parameter_counts
from .select import Selection, SelectionError, _open, select_layers, selection_without_store
from .train import History, StepCallback, TrainSettings, train_lora

SELECTION_FILE = "mechhi_selection.json"  # beside peft's adapter_config.json


LOG_FILE = "training_log.json"


CHECKPOINT_FILE = "checkpoint.pt"


@dataclass(frozen=True)
class FinetuneConfig:
    """Defaults of `mechhi finetune`: LoRA on the toy model's top-4 Head Impact layers."""

    store: str | None = "stores/toy.zarr"  # scored store to rank layers from (None: only full / layers=...)
    select: str = "top-4"  # top-K | bottom-K | random-K | full | layers=3,7
    out: str | None = None  # adapter directory (default: adapters/<store name>-<select>)
    dataset: str | None = None  # mechhi-format dataset with train/val splits (default: toy, built on first use)
    model: str | None = None  # base model (default: the store's `model` attr, else the bundled toy)
    select_seed: int = 0  # draws random-K
    template: str = "caption"  # prompt template; the loss is on its answer (description) tokens
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # base weights: auto (bf16 on capable CUDA, else float32) | float32 | bfloat16
    threads: int | None = None  # torch CPU threads (None: torch's default; 1 is fastest on a busy machine)
    lora: LoraSettings = LoraSettings()
    train: TrainSettings = TrainSettings()

    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        name = Path(self.store).stem if self.store else "model"
        return Path("adapters") / f"{name}-{self.select.replace('=', '-').replace(',', '_')}"


@dataclass
class FinetuneResult:
    """What one fine-tuning run produced (also written to the adapter directory)."""

    out: Path
    selection: Selection
    params: dict[str, float]
    history: History
    norms: dict[str, Any]
    resumed_finished: bool = False  # True: the directory already held this finished run

    def summary(self) -> dict[str, Any]:
        return {"out": str(self.out), "layers": list(self.selection.layers), "params": self.params,
                "best_step": self.history.best_step, "best_val_loss": self.history.best_loss,
                "stopped_early": self.history.stopped_early,
                "lora_B_norm": self.norms["lora_B"], "lora_A_norm": self.norms["lora_A"]}  # fmt: skip


def resolve_model_id(model: str | None, store_ds: xr.Dataset | None) -> str:
    from ..bundled import BUNDLED_MODEL

    if model:
        return model
    if store_ds is not None and store_ds.attrs.get("model"):
        return str(store_ds.attrs["model"])
    return str(BUNDLED_MODEL)


def resolve_dataset(dataset: str | None, *, progress: bool = True) -> Path:
    return Path(dataset) if dataset else ensure_toy_dataset(progress=progress)


def _run_id(config: FinetuneConfig, selection: Selection, model_id: str, dataset: KeyObjectDataset) -> str:
    """Fingerprint of everything that determines the trained adapter."""
    fields = {"config": {k: v for k, v in json.loads(json.dumps(asdict(config), default=str)).items()
                         if k not in ("out", "device", "threads")},
              "layers": list(selection.layers), "model": model_id, "dataset": dataset.fingerprint,
              "hi": selection.provenance.get("head_impact_fingerprint")}  # fmt: skip
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def finetune(
    config: FinetuneConfig,
    *,
    progress: bool = True,
    loaded: tuple[Any, VLMAdapter] | None = None,
    on_step: StepCallback | None = None,
) -> FinetuneResult:
    """Select layers from the store, train LoRA on them, save the adapter with its metadata.

    A rerun resumes an interrupted run from its checkpoint, and returns a finished one
    without retraining. ``loaded`` passes a (model, adapter) pair; it is given back
    unchanged (the LoRA layers are removed again before returning).
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    store_ds = _open(config.store)[0] if config.store else None
    model_id = resolve_model_id(config.model, store_ds)
    if loaded is None:
        from ..models.loading import load

        loaded = load(model_id, device=config.device, dtype=config.dtype)
    model, adapter = loaded
    if config.store:
        selection = select_layers(store_ds, config.select, seed=config.select_seed)  # opened once, above
    else:
        selection = selection_without_store(config.select, adapter.n_layers)
    if store_ds is not None and store_ds.sizes["layer"] != adapter.n_layers:
        raise SelectionError(f"the store ranks {store_ds.sizes['layer']} layers but {model_id} has {adapter.n_layers}: "
                             "a store of another model?")  # fmt: skip
    data_dir = resolve_dataset(config.dataset, progress=progress)
    train = load_split(data_dir, "train", config.train.train_limit)
    val = load_split(data_dir, "val", config.train.val_limit)
    out, run_id = config.out_dir(), _run_id(config, selection, model_id, train)
    finished = _finished(out, run_id)
    if finished is not None:
        return finished
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.train.seed)  # LoRA A init
    peft_model = attach_lora(model, adapter, selection.layers, config.lora)
    try:
        history = train_lora(peft_model, adapter, train.samples, val.samples, config.train,
                             checkpoint=out / CHECKPOINT_FILE, run_id=run_id, template=config.template,
                             progress=progress, on_step=on_step)  # fmt: skip
        result = FinetuneResult(out, selection, parameter_counts(peft_model), history, lora_norms(peft_model))
        _save(peft_model, result, config, model_id, data_dir, train, run_id)
    finally:
        peft_model.unload()  # the caller's model, without LoRA layers
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    return result


def _save(peft_model, result: FinetuneResult, config, model_id, data_dir, train, run_id) -> None:
    peft_model.save_pretrained(result.out, save_embedding_layers=False)
    meta = {
        "mechhi_version": __version__,
        "run_id": run_id,
        "base_model": model_id,
        "selection": result.selection.as_dict(),
        "lora": asdict(config.lora),
        "target_modules": peft_model.peft_config["default"].target_modules,
        "params": result.params,
        "lora_norms": {k: v for k, v in result.norms.items() if k != "per_module"},
        "dataset": f"{Path(data_dir).resolve()}#{train.fingerprint}",
        "template": config.template,
        "train": asdict(config.train),
        "best_step": result.history.best_step,
        "best_val_loss": result.history.best_loss,
        "stopped_early": result.history.stopped_early,
    }
    (result.out / LOG_FILE).write_text(json.dumps({**asdict(result.history), "norms": result.norms}, indent=1) + "\n")
    (result.out / SELECTION_FILE).write_text(json.dumps(meta, indent=1, default=str) + "\n")


def _finished(out: Path, run_id: str) -> FinetuneResult | None:
    """The result stored in ``out`` if it holds a finished run with this ``run_id``."""
    meta_path, log_path = out / SELECTION_FILE, out / LOG_FILE
    if not (meta_path.is_file() and log_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("run_id") != run_id:
        raise ValueError(f"{out} holds an adapter from another run (run_id {meta.get('run_id')}); choose another --out")
    log = json.loads(log_path.read_text())
    norms = log.pop("norms")
    sel = meta["selection"]
    selection = Selection(sel["spec"], tuple(sel["layers"]), sel["provenance"])
    history = History(**{f.name: log[f.name] for f in dataclasses.fields(History)})
    return FinetuneResult(out, selection, meta["params"], history, norms, resumed_finished=True)


def read_selection(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``mechhi_selection.json`` of an adapter directory."""
    path = Path(adapter_dir) / SELECTION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir} has no {SELECTION_FILE}: not an adapter written by mechhi finetune")
    return json.loads(path.read_text())
