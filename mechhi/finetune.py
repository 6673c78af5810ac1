"""LoRA on the decoder layers a store's Head Impact ranking picks: `mechhi finetune`.

The paper's claim (section 5) is that *which* layers get adapters matters: fine-tuning
the four layers of highest Head Impact moves the model further than the four lowest or
four random ones. To test that claim honestly the layer choice must come from the
store, not be recomputed on the side, and every adapter must say where its layers came
from. So:

- `select_layers` reads the store's ``head_impact`` (never re-scores it) and returns the
  layers plus provenance (store path, model, dataset fingerprint, a fingerprint of the
  head_impact values);
- `attach_lora` hands the surgery to peft with the adapter's ``lora_target_regex``
  (q/k/v of the chosen decoder layers only, never the vision tower) and then checks
  that peft wrapped exactly those modules;
- `train_lora` trains on the captioning task with the loss on the answer tokens only,
  validation-loss early stopping, gradient accumulation, bf16 autocast on CUDA, and a
  checkpoint (adapter + optimizer + step + RNG) that a rerun resumes from exactly: the
  order of the training samples is a pure function of (seed, epoch).

The adapter directory holds peft's files plus ``mechhi_selection.json`` (layers,
provenance, trainable-parameter counts) and ``training_log.json`` (loss curves).

>>> result = finetune(FinetuneConfig(store="stores/toy.zarr", select="top-4"))  # doctest: +SKIP
>>> result.layers, result.params["trainable_pct"]                                # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from . import __version__
from .data.format import KeyObjectDataset, Sample, load_dataset
from .models import AdapterError, PreparedBatch, VLMAdapter

SELECTION_FILE = "mechhi_selection.json"  # beside peft's adapter_config.json
LOG_FILE = "training_log.json"
CHECKPOINT_FILE = "checkpoint.pt"
# The toy fine-tuning dataset: descriptions carry a size word ("a large red circle") that
# the bundled model never saw, so there is something new to learn.
TOY_FINETUNE_DATASET = Path("data/toy-finetune")
TOY_FINETUNE_IMAGES = 500
TOY_FINETUNE_SEED = 4_242  # a world seed that neither the toy training nor its held-out set uses
TOY_FINETUNE_SPLITS = {"train": 0.6, "val": 0.15, "test": 0.25}  # the paper's 1200 / 300 / 500


class SelectionError(ValueError):
    """A layer-selection spec or store that cannot give the layers asked for."""


# ============================================================================ selection


@dataclass(frozen=True)
class Selection:
    """The chosen decoder layers and where the choice came from."""

    spec: str
    layers: tuple[int, ...]  # ascending
    provenance: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "layers": list(self.layers), "provenance": self.provenance}


_SPEC = re.compile(r"^(?:(top|bottom|random)-(\d+)|full|layers=(\d+(?:,\d+)*))$")


def parse_spec(spec: str) -> tuple[str, int | tuple[int, ...] | None]:
    """'top-4' -> ('top', 4); 'full' -> ('full', None); 'layers=3,7' -> ('layers', (3, 7))."""
    match = _SPEC.match(spec.replace(" ", ""))
    if not match:
        raise SelectionError(f"layer selection {spec!r}: use top-K, bottom-K, random-K, full or layers=3,7")
    kind, k, listed = match.groups()
    if kind:
        if int(k) < 1:
            raise SelectionError(f"layer selection {spec!r}: K must be at least 1")
        return kind, int(k)
    if listed:
        return "layers", tuple(sorted({int(x) for x in listed.split(",")}))
    return "full", None


def head_impact_fingerprint(head_impact: xr.DataArray) -> str:
    """sha256 (16 hex) of the (layer, head) values: says which ranking an adapter came from."""
    values = np.ascontiguousarray(head_impact.transpose("layer", "head").values, dtype=np.float64)
    digest = hashlib.sha256(repr(values.shape).encode() + values.tobytes())
    return digest.hexdigest()[:16]


def _store_provenance(ds: xr.Dataset, source: str | os.PathLike | None) -> dict[str, Any]:
    source = source or ds.encoding.get("source")  # xarray records the path it opened
    return {
        "store": str(Path(source).resolve()) if source else None,
        "model": ds.attrs.get("model"),
        "dataset": ds.attrs.get("dataset"),
    }


def _ranked_layers(ds: xr.Dataset) -> tuple[list[int], list[float], str]:
    """Finite-ranked layers (best first), their mean HI, and the values' fingerprint."""
    if "head_impact" not in ds.data_vars:
        raise SelectionError(
            "the store has no head_impact variable: score it first (`mechhi rank --store S` or "
            "`mechhi stats --store S` writes it); mechhi does not re-score a store silently"
        )
    from probes.head_impact import layer_ranking

    hi = ds["head_impact"].compute()
    ranking = layer_ranking(xr.Dataset({"head_impact": hi}))
    finite = np.isfinite(ranking.values)
    layers = [int(x) for x in ranking.layer.values[finite]]
    return layers, [float(x) for x in ranking.values[finite]], head_impact_fingerprint(hi)


def _open(store: xr.Dataset | str | os.PathLike) -> tuple[xr.Dataset, str | None]:
    """(dataset, the path it came from when known)."""
    if isinstance(store, xr.Dataset):
        return store, None
    from .store import open_store

    return open_store(store), str(store)


def select_layers(store_ds: xr.Dataset | str | os.PathLike, spec: str, *, seed: int = 0) -> Selection:
    """The decoder layers a spec picks from a store's Head Impact ranking.

    ``top-K`` / ``bottom-K``: the K layers of highest / lowest mean HI over heads (ties
    keep the lower layer index on top); ``random-K``: K layers drawn (seeded) from the
    layers in neither top-K nor bottom-K; ``full``: every layer; ``layers=3,7``: those.
    Layers whose mean HI is NaN are never ranked.

    >>> select_layers("stores/toy.zarr", "top-4").layers        # doctest: +SKIP
    (3, 5, 6, 9)
    """
    ds, source = _open(store_ds)
    kind, arg = parse_spec(spec)
    all_layers = [int(x) for x in ds["layer"].values]
    provenance = _store_provenance(ds, source)
    if kind in ("full", "layers"):
        layers = all_layers if kind == "full" else list(arg)  # type: ignore[arg-type]
        missing = sorted(set(layers) - set(all_layers))
        if missing:
            raise SelectionError(f"layer selection {spec!r}: layers {missing} not in the store (0..{max(all_layers)})")
        if "head_impact" in ds.data_vars:
            provenance["head_impact_fingerprint"] = head_impact_fingerprint(ds["head_impact"].compute())
        return Selection(spec, tuple(sorted(layers)), provenance)
    ranked, scores, fingerprint = _ranked_layers(ds)
    k = int(arg)  # type: ignore[arg-type]
    need = 3 * k if kind == "random" else k
    if len(ranked) < need:
        what = "top-K, bottom-K and random-K disjoint" if kind == "random" else "them"
        raise SelectionError(
            f"layer selection {spec!r} needs {need} ranked layers to keep {what}; the store ranks {len(ranked)}"
        )
    top, bottom = ranked[:k], ranked[-k:]
    if kind == "top":
        layers = top
    elif kind == "bottom":
        layers = bottom
    else:
        pool = sorted(set(ranked) - set(top) - set(bottom))  # (len(ranked) - 2k,)
        layers = [int(x) for x in np.random.default_rng(seed).choice(pool, size=k, replace=False)]
        provenance["random_seed"] = seed
    provenance.update(
        head_impact_fingerprint=fingerprint,
        ranking=[{"layer": layer, "mean_head_impact": s} for layer, s in zip(ranked, scores)],
    )
    return Selection(spec, tuple(sorted(layers)), provenance)


def selection_without_store(spec: str, n_layers: int) -> Selection:
    """``full`` or ``layers=...`` for a model without a store (no ranking needed)."""
    kind, arg = parse_spec(spec)
    if kind not in ("full", "layers"):
        raise SelectionError(f"layer selection {spec!r} ranks layers: give a scored store (--store S)")
    layers = list(range(n_layers)) if kind == "full" else list(arg)  # type: ignore[arg-type]
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise SelectionError(f"layer selection {spec!r}: layers {bad} outside the model's 0..{n_layers - 1}")
    return Selection(spec, tuple(sorted(layers)), {"store": None})


# ============================================================================ LoRA


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
    pattern = re.compile(rf"(?:.*\.)?{re.escape(adapter.decoder_layers)}\.(\d+)\.{re.escape(adapter.attention)}\.(\w+)_proj")
    found: dict[int, list[str]] = {}
    for name in names:
        match = pattern.fullmatch(name)
        if not match:
            raise AdapterError(f"LoRA landed on {name!r}, outside {adapter.decoder_layers}.*.{adapter.attention}")
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
    model: torch.nn.Module, adapter: VLMAdapter, layers: Sequence[int], settings: LoraSettings = LoraSettings()
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


# ============================================================================ training data


def answer_labels(batch: PreparedBatch) -> torch.Tensor:
    """(B, T) labels: the input id at each answer (description) token, -100 elsewhere.

    The same positions perplexity scores (the adapter's ``query_positions``), so the
    training loss and the evaluated metric measure one thing.
    """
    ids = batch.inputs["input_ids"]
    labels = torch.full_like(ids, -100)
    for i, layout in enumerate(batch.layouts):
        pos = torch.as_tensor(layout.query_positions)
        labels[i, pos] = ids[i, pos]
    return labels


def answer_loss(model: torch.nn.Module, batch: PreparedBatch, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens (token t is predicted at t - 1); by
    default the answer tokens, ``answer_labels``."""
    labels = (answer_labels(batch) if labels is None else labels)[:, 1:]  # (B, T-1)
    logits = model(**batch.inputs).logits[:, :-1]  # (B, T-1, vocab)
    keep = labels != -100
    return torch.nn.functional.cross_entropy(logits[keep].float(), labels[keep])  # only (n_answer, vocab) in float


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a pure function of (seed, epoch), so resume is exact."""
    return np.random.default_rng([seed, epoch, 7]).permutation(n)


def micro_batches(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless stream of sample-index micro-batches, epoch after epoch (last one may be short)."""
    epoch = 0
    while True:
        order = epoch_order(n, seed, epoch)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]
        epoch += 1


def ensure_toy_dataset(path: str | os.PathLike = TOY_FINETUNE_DATASET, *, progress: bool = True) -> Path:
    """Build (or resume) the toy fine-tuning dataset with size words in the descriptions."""
    from .data.synthetic import WorldConfig, build_synthetic

    return build_synthetic(path, n_images=TOY_FINETUNE_IMAGES, seed=TOY_FINETUNE_SEED,
                           splits=TOY_FINETUNE_SPLITS, config=WorldConfig(describe_size=True),
                           progress=progress)  # fmt: skip


def load_split(dataset: str | os.PathLike, split: str, limit: int | None = None) -> KeyObjectDataset:
    """One split of a dataset, failing with a clear message when it is empty."""
    data = load_dataset(dataset, split=split)
    if len(data) == 0:
        raise ValueError(f"dataset {dataset} has no samples in split {split!r} (splits: {load_dataset(dataset).split_counts()})")
    if limit is not None and limit < len(data):
        data.samples = data.samples[:limit]
    return data


def prepare_samples(adapter: VLMAdapter, samples: Sequence[Sample], template: str = "caption") -> PreparedBatch:
    return adapter.prepare([s.image() for s in samples], [s.description for s in samples], template=template)


# ============================================================================ training loop


@dataclass(frozen=True)
class TrainSettings:
    """Training hyperparameters. Defaults are sized for the bundled toy model on 2 CPU cores
    (a setup takes about a minute there); raise them for real checkpoints."""

    max_steps: int = 60  # optimizer steps (each of batch_size * grad_accum samples)
    batch_size: int = 8  # samples per forward pass
    grad_accum: int = 2  # forward passes per optimizer step
    lr: float = 1e-3  # AdamW, constant after warmup; LoRA tolerates high rates
    warmup: int = 5  # linear warmup steps
    weight_decay: float = 0.0
    eval_every: int = 10  # validation loss every N steps
    patience: int = 3  # stop after this many validations without improvement (0: never stop early)
    val_limit: int | None = 48  # validation samples (None: the whole val split)
    train_limit: int | None = None  # training samples (None: the whole train split)
    checkpoint_every: int = 10  # steps between resumable checkpoints
    seed: int = 0  # LoRA init, sample order
    autocast: bool = True  # bf16 autocast on CUDA devices that support it
    clip_grad: float = 1.0  # max gradient norm

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainSettings.{name}={getattr(self, name)!r} must be at least 1")
        if self.patience < 0 or self.lr <= 0:
            raise ValueError(f"TrainSettings: patience={self.patience}, lr={self.lr} must be >= 0 and > 0")


@dataclass
class History:
    """The loss curves and early-stopping state; saved in checkpoints and the adapter dir."""

    train: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss", "lr"}
    val: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss"}
    best_step: int = 0
    best_loss: float = math.inf
    bad_evals: int = 0
    stopped_early: bool = False
    seconds: float = 0.0


def _lr(step: int, settings: TrainSettings) -> float:
    return settings.lr * min(1.0, (step + 1) / max(1, settings.warmup))


def _autocast(device: torch.device, settings: TrainSettings) -> contextlib.AbstractContextManager:
    """bf16 autocast on a CUDA device that has bf16; nothing elsewhere (CPU bf16 is slow)."""
    if settings.autocast and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _input_dtype(model: torch.nn.Module) -> torch.dtype:
    return model.get_input_embeddings().weight.dtype


def validation_loss(model: torch.nn.Module, adapter: VLMAdapter, samples: Sequence[Sample], *,
                    batch_size: int, template: str = "caption") -> float:  # fmt: skip
    """Mean over samples of the mean answer-token NLL: log of the paper's perplexity."""
    from .evaluate import answer_scores

    was_training = model.training
    model.eval()
    try:
        nll, _ = answer_scores(model, adapter, [s.image() for s in samples], [s.description for s in samples],
                               template=template, batch_size=batch_size)  # fmt: skip
    finally:
        model.train(was_training)
    return float(np.mean(nll))


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in _trainable(model).items()}


def _restore(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = _trainable(model)
    if sorted(params) != sorted(weights):
        raise ValueError("checkpoint LoRA weights do not match the model's trainable parameters")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write to a temporary file, then rename: an interrupt never leaves a half checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


StepCallback = Callable[[int, float], None]


def train_lora(
    model: torch.nn.Module,
    adapter: VLMAdapter,
    train: Sequence[Sample],
    val: Sequence[Sample],
    settings: TrainSettings,
    *,
    checkpoint: Path | None = None,
    run_id: str = "",
    template: str = "caption",
    progress: bool = True,
    on_step: StepCallback | None = None,
) -> History:
    """Train the model's trainable (LoRA) parameters; on return they hold the best-validation weights.

    With ``checkpoint``, state is saved every ``checkpoint_every`` steps and a later call
    with the same ``run_id`` resumes from it. ``on_step(step, loss)`` runs after each
    optimizer step (tests raise in it to simulate an interruption).
    """
    device = next(model.parameters()).device
    params = list(_trainable(model).values())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    history, best, start = History(), _snapshot(model), 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        if state["run_id"] != run_id:
            raise ValueError(f"{checkpoint} belongs to another fine-tuning run; delete it to start over")
        _restore(model, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        history, best, start = History(**state["history"]), state["best"], state["step"]
        _set_rng_state(state["rng"])
    stream = micro_batches(len(train), settings.batch_size, settings.seed)
    for _ in range(start * settings.grad_accum):  # skip what was already trained on: indices only
        next(stream)
    began = time.time() - history.seconds
    model.train()
    with _progress_bar(progress, settings.max_steps, start) as advance:
        for step in range(start, settings.max_steps):
            loss = _optimizer_step(model, adapter, train, stream, optimizer, params, settings, step, device, template)
            history.train.append({"step": step + 1, "loss": loss, "lr": _lr(step, settings)})
            if (step + 1) % settings.eval_every == 0 or step + 1 == settings.max_steps:
                best = _validate(model, adapter, val, settings, history, step + 1, best, template)
            history.seconds = time.time() - began
            advance(loss, history)
            stop = settings.patience and history.bad_evals >= settings.patience
            if checkpoint is not None and ((step + 1) % settings.checkpoint_every == 0 or stop):
                _save_checkpoint(checkpoint, {"run_id": run_id, "lora": _snapshot(model), "best": best,
                                              "optimizer": optimizer.state_dict(), "step": step + 1,
                                              "history": asdict(history), "rng": _rng_state()})  # fmt: skip
            if on_step is not None:
                on_step(step + 1, loss)
            if stop:
                history.stopped_early = True
                break
    _restore(model, best)
    model.eval()
    return history


def _optimizer_step(model, adapter, train, stream, optimizer, params, settings, step, device, template) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; returns the mean micro-batch loss."""
    for group in optimizer.param_groups:
        group["lr"] = _lr(step, settings)
    optimizer.zero_grad(set_to_none=True)
    losses = []
    for _ in range(settings.grad_accum):
        chunk = [train[int(i)] for i in next(stream)]
        batch = prepare_samples(adapter, chunk, template).to(device, _input_dtype(model))
        with _autocast(device, settings):
            loss = answer_loss(model, batch)
        (loss / settings.grad_accum).backward()
        losses.append(loss.item())
    if settings.clip_grad:
        torch.nn.utils.clip_grad_norm_(params, settings.clip_grad)
    optimizer.step()
    return float(np.mean(losses))


def _validate(model, adapter, val, settings, history: History, step: int, best, template) -> dict:
    """Record the validation loss; keep the best weights; count validations without improvement."""
    with _autocast(next(model.parameters()).device, settings):
        loss = validation_loss(model, adapter, val, batch_size=settings.batch_size, template=template)
    history.val.append({"step": step, "loss": loss})
    if loss < history.best_loss:
        history.best_loss, history.best_step, history.bad_evals = loss, step, 0
        return _snapshot(model)
    history.bad_evals += 1
    return best


@contextlib.contextmanager
def _progress_bar(show: bool, total: int, start: int):
    """Yields ``advance(loss, history)``; a rich bar when ``show``."""
    if not show:
        yield lambda loss, history: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("fine-tuning"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns) as bar:
        task = bar.add_task("train", total=total, completed=start, info="")

        def advance(loss: float, history: History) -> None:
            val = f" val {history.val[-1]['loss']:.3f}" if history.val else ""
            bar.update(task, advance=1, info=f"loss {loss:.3f}{val}")

        yield advance


# ============================================================================ the command


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
    from .bundled import BUNDLED_MODEL

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
        from .models.loading import load

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
