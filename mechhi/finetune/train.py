"""The training loop: LoRA parameters only, answer-token loss, validation early
stopping, gradient accumulation, checkpoints that a rerun resumes from exactly."""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.format import Sample
from ..models import VLMAdapter
from .data import micro_batches, prepare_samples
from .loss import answer_loss


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
    from ..evaluate.metrics import answer_scores

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
