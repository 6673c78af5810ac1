"""`mechhi finetune`: select layers from a store, train LoRA on them, save the adapter
with ``mechhi_selection.json`` (layers, provenance, parameter counts) and
``training_log.json`` (loss curves). A rerun resumes; a finished run is returned as is.

The same call runs in one process or in each process of ``accelerate launch``: every
process trains its share (`mechhi.finetune.train`), the main one writes the directory.

>>> result = finetune(FinetuneConfig(store="stores/toy.zarr", select="top-4"))  # doctest: +SKIP
>>> result.layers, result.params["trainable_pct"]                                # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import xarray as xr

from mechhi.bundled import BUNDLED_MODEL
from mechhi.finetune.accel import make_accelerator
from mechhi.finetune.depth import DEFAULT_BAND
from mechhi.finetune.lora import LoraSettings, attach_lora, lora_norms, parameter_counts
from mechhi.finetune.select import Selection, SelectionError, _open, select_layers, selection_without_store
from mechhi.finetune.train import History, StepCallback, TrainSettings, train_lora
from mechhi.finetune.training_data import FinetuneData, ensure_toy_dataset
from mechhi.jsonfiles import json_key
from mechhi.models import VLMAdapter
from mechhi.models.loading import load
from mechhi.version import __version__

SELECTION_FILE = "mechhi_selection.json"  # beside peft's adapter_config.json


LOG_FILE = "training_log.json"


CHECKPOINT_DIR = "checkpoints"  # accelerate save_state directories while a run is unfinished


@dataclass(frozen=True)
class FinetuneConfig:
    """Defaults of `mechhi finetune`: LoRA on the toy model's top-4 Head Impact layers."""

    store: str | None = "stores/toy.zarr"  # scored store to rank layers from (None: only full / layers=...)
    select: str = "top-4"  # top-K | bottom-K | random-K | depth-K | full | layers=3,7
    out: str | None = None  # adapter directory (default: adapters/<store name>-<select>)
    dataset: str | None = (
        None  # mechhi-format dataset with train/val splits (default: toy, built on first use)
    )
    model: str | None = None  # base model (default: the store's `model` attr, else the bundled toy)
    select_seed: int = 0  # draws random-K and depth-K
    depth_band: float = DEFAULT_BAND  # depth-K: partners within this relative depth of each top-K layer
    template: str = "caption"  # prompt template; the loss is on its answer (description) tokens
    device: str = "auto"  # auto | cpu | cuda[:N] (under accelerate launch: each process's own device)
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
        return {
            "out": str(self.out),
            "layers": list(self.selection.layers),
            "params": self.params,
            "best_step": self.history.best_step,
            "best_val_loss": self.history.best_loss,
            "stopped_early": self.history.stopped_early,
            "already_finished": self.resumed_finished,
            "lora_B_norm": self.norms["lora_B"],
            "lora_A_norm": self.norms["lora_A"],
        }


def resolve_model_id(model: str | None, store_ds: xr.Dataset | None) -> str:
    if model:
        return model
    if store_ds is not None and store_ds.attrs.get("model"):
        return str(store_ds.attrs["model"])
    return str(BUNDLED_MODEL)


def resolve_dataset(dataset: str | None, *, progress: bool = True) -> Path:
    return Path(dataset) if dataset else ensure_toy_dataset(progress=progress)


def _run_id(
    config: FinetuneConfig, selection: Selection, model_id: str, fingerprint: str, processes: int
) -> str:
    """Fingerprint of everything that determines the trained adapter (the number of
    processes too: each takes ``batch_size`` samples per micro-batch)."""
    fields = {
        "config": {
            k: v
            for k, v in json.loads(json.dumps(asdict(config), default=str)).items()
            if k not in ("out", "device", "threads")
        },
        "layers": list(selection.layers),
        "model": model_id,
        "dataset": fingerprint,
        "hi": selection.provenance.get("head_impact_fingerprint"),
        "processes": processes,
    }
    return json_key(fields)


def finetune(
    config: FinetuneConfig,
    *,
    progress: bool = True,
    loaded: tuple[Any, VLMAdapter] | None = None,
    data: FinetuneData | None = None,
    on_step: StepCallback | None = None,
) -> FinetuneResult:
    """Select layers from the store, train LoRA on them, save the adapter with its metadata.

    A rerun resumes an interrupted run from its checkpoint, and returns a finished one
    without retraining. ``loaded`` passes a (model, adapter) pair; it is given back
    unchanged (the LoRA layers are removed again before returning). ``data`` passes the
    train/val samples already read (`FinetuneData.read` of ``config.dataset``).
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    accelerator = make_accelerator(
        device=config.device, precision=config.train.mixed_precision, grad_accum=config.train.grad_accum
    )
    store_ds = _open(config.store)[0] if config.store else None
    model_id = resolve_model_id(config.model, store_ds)
    if loaded is None:
        loaded = load(model_id, device=str(accelerator.device), dtype=config.dtype)
    model, adapter = loaded
    selection = _selection(config, store_ds, model_id, adapter.n_layers)
    if accelerator.is_main_process:
        _warn_partial(selection)
    if data is None:
        data = FinetuneData.read(
            resolve_dataset(config.dataset, progress=progress),
            train_limit=config.train.train_limit,
            val_limit=config.train.val_limit,
        )
    out = config.out_dir()
    run_id = _run_id(config, selection, model_id, data.fingerprint, accelerator.num_processes)
    finished = _finished(out, run_id)
    if finished is not None:
        return finished
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.train.seed)  # LoRA A init
    peft_model = attach_lora(model, adapter, selection.layers, config.lora)
    try:
        history = train_lora(
            peft_model,
            adapter,
            data,
            config.train,
            accelerator=accelerator,
            checkpoints=out / CHECKPOINT_DIR,
            run_id=run_id,
            template=config.template,
            progress=progress,
            on_step=on_step,
        )
        result = FinetuneResult(out, selection, parameter_counts(peft_model), history, lora_norms(peft_model))
        if accelerator.is_main_process:
            _save(peft_model, result, config, model_id, data, run_id)
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        accelerator.wait_for_everyone()
    finally:
        peft_model.unload()  # the caller's model, without LoRA layers
    return result


def _selection(
    config: FinetuneConfig, store_ds: xr.Dataset | None, model_id: str, n_layers: int
) -> Selection:
    """The layers the config picks, from the store's ranking (opened once) or the model's depth."""
    if store_ds is None:
        return selection_without_store(config.select, n_layers)
    if store_ds.sizes["layer"] != n_layers:
        raise SelectionError(
            f"the store ranks {store_ds.sizes['layer']} layers but {model_id} has {n_layers}: "
            "a store of another model?"
        )
    return select_layers(store_ds, config.select, seed=config.select_seed, depth_band=config.depth_band)


_WARNED: set[tuple] = set()  # (store, traced): each partial store is warned about once per process


def _warn_partial(selection: Selection) -> None:
    """Say (stderr, once per store) when the ranking rests on part of the store's samples only."""
    prov = selection.provenance
    traced, total = prov.get("traced_samples"), prov.get("store_samples")
    if traced is not None and traced < total and (prov.get("store"), traced) not in _WARNED:
        _WARNED.add((prov.get("store"), traced))
        print(
            f"warning: the layer ranking rests on {traced} of the store's {total} samples (the trace is "
            "unfinished; rerun the same `mechhi trace` to finish it)",
            file=sys.stderr,
        )


def _save(peft_model, result: FinetuneResult, config, model_id: str, data: FinetuneData, run_id: str) -> None:
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
        "dataset": f"{data.root.resolve()}#{data.fingerprint}",
        "template": config.template,
        "train": asdict(config.train),
        "best_step": result.history.best_step,
        "best_val_loss": result.history.best_loss,
        "stopped_early": result.history.stopped_early,
    }
    (result.out / LOG_FILE).write_text(
        json.dumps({**asdict(result.history), "norms": result.norms}, indent=1) + "\n"
    )
    (result.out / SELECTION_FILE).write_text(json.dumps(meta, indent=1, default=str) + "\n")


def _finished(out: Path, run_id: str) -> FinetuneResult | None:
    """The result stored in ``out`` if it holds a finished run with this ``run_id``."""
    meta_path, log_path = out / SELECTION_FILE, out / LOG_FILE
    if not (meta_path.is_file() and log_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("run_id") != run_id:
        raise ValueError(
            f"{out} holds an adapter from another run (run_id {meta.get('run_id')}); choose another --out"
        )
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
        raise FileNotFoundError(
            f"{adapter_dir} has no {SELECTION_FILE}: not an adapter written by mechhi finetune"
        )
    return json.loads(path.read_text())
