"""The training loop on accelerate: LoRA parameters only, the answer-token loss (per
sample, so data parallelism is exact), validation early stopping that keeps the best
weights, resumable from atomic checkpoints.

accelerate does what depends on where the run is: device placement, DDP across
launched processes, bf16/fp16 autocast (and fp16's loss scaling), gradient accumulation
(no gradient sync until the last micro-batch; the optimizer steps once per
``grad_accum`` micro-batches), and the optimizer / RNG state in checkpoints. What stays
here is the order of the samples (`mechhi.finetune.order`, a pure function of the step),
the learning-rate warmup, validation and early stopping.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mechhi.finetune.accel import make_accelerator
from mechhi.finetune.checkpoint import Checkpoints
from mechhi.finetune.loss import answer_loss
from mechhi.finetune.order import micro_batch, rank_part
from mechhi.finetune.training_data import FinetuneData, prepare_samples
from mechhi.finetune.validate import gathered_loss
from mechhi.models import VLMAdapter
from mechhi.progress import progress_bar


@dataclass(frozen=True)
class TrainSettings:
    """Training hyperparameters. Defaults are sized for the bundled toy model on 2 CPU cores
    (a setup takes about a minute there); raise them for real checkpoints."""

    max_steps: int = 60  # optimizer steps (each of batch_size * processes * grad_accum samples)
    batch_size: int = 8  # samples per forward pass, per process
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
    mixed_precision: str = "auto"  # auto (bf16 on CUDA that has it, else none) | no | bf16 | fp16
    clip_grad: float = 1.0  # max gradient norm

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainSettings.{name}={getattr(self, name)!r} must be at least 1")
        if self.patience < 0 or self.lr <= 0:
            raise ValueError(f"TrainSettings: patience={self.patience}, lr={self.lr} must be >= 0 and > 0")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"mixed precision {self.mixed_precision!r}: choose auto, no, bf16 or fp16")


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


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in _trainable(model).items()}


def _restore(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    params = _trainable(model)
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


class LoopState:
    """What the loop knows and accelerate does not: the step, the curves, the best weights.
    Registered with the accelerator, so it travels in every checkpoint."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.step, self.history, self.best = 0, History(), _snapshot(model)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "history": asdict(self.history), "best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.history, self.best = state["step"], History(**state["history"]), state["best"]


StepCallback = Callable[[int, float], None]


@dataclass
class _Run:
    """One training run's fixed parts, shared by its steps."""

    accelerator: Any
    model: Any  # as prepared by accelerate (DDP-wrapped under several processes)
    inner: torch.nn.Module  # the model itself
    params: list[torch.Tensor]  # its trainable (LoRA) parameters
    optimizer: Any
    adapter: VLMAdapter
    data: FinetuneData
    settings: TrainSettings
    template: str


def _lr(step: int, settings: TrainSettings) -> float:
    return settings.lr * min(1.0, (step + 1) / max(1, settings.warmup))


def train_lora(
    model: torch.nn.Module,
    adapter: VLMAdapter,
    data: FinetuneData,
    settings: TrainSettings,
    *,
    accelerator: Any = None,
    checkpoints: Path | None = None,
    run_id: str = "",
    template: str = "caption",
    progress: bool = True,
    on_step: StepCallback | None = None,
) -> History:
    """Train the model's trainable (LoRA) parameters; on return they hold the best-validation weights.

    With ``checkpoints`` (a directory), state is saved every ``checkpoint_every`` steps and a
    later call with the same ``run_id`` resumes from it. ``on_step(step, loss)`` runs after
    each optimizer step (tests raise in it to simulate an interruption).
    """
    accelerator = accelerator or make_accelerator(
        precision=settings.mixed_precision, grad_accum=settings.grad_accum
    )
    prepared = accelerator.prepare(model)
    inner = accelerator.unwrap_model(prepared)
    params = list(_trainable(inner).values())
    optimizer = accelerator.prepare(
        torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    )
    run = _Run(accelerator, prepared, inner, params, optimizer, adapter, data, settings, template)
    state = LoopState(inner)
    accelerator.register_for_checkpointing(state)
    saver = Checkpoints(checkpoints, accelerator, run_id) if checkpoints is not None else None
    if saver is not None:
        saver.resume()
    try:
        _loop(run, state, saver, progress and accelerator.is_main_process, on_step)
    finally:
        accelerator.free_memory()  # the accelerator lets go of the model and optimizer
    _restore(inner, state.best)
    inner.eval()
    return state.history


def _loop(
    run: _Run, state: LoopState, saver: Checkpoints | None, progress: bool, on_step: StepCallback | None
) -> None:
    settings, history = run.settings, state.history
    began = time.time() - history.seconds
    run.model.train()
    with _progress_bar(progress, settings.max_steps, state.step) as advance:
        while state.step < settings.max_steps:
            loss = _optimizer_step(run, state.step)
            state.step += 1
            history.train.append({"step": state.step, "loss": loss, "lr": _lr(state.step - 1, settings)})
            if state.step % settings.eval_every == 0 or state.step == settings.max_steps:
                _validate(run, state)
            history.seconds = time.time() - began
            advance(loss, history)
            stop = bool(settings.patience) and history.bad_evals >= settings.patience
            if saver is not None and (state.step % settings.checkpoint_every == 0 or stop):
                saver.save(state.step)
            if on_step is not None:
                on_step(state.step, loss)
            if stop:
                history.stopped_early = True
                break


def _micro_batch(run: _Run, index: int) -> Any:
    """This process's part of global micro-batch ``index``, prepared and on its device."""
    acc, settings = run.accelerator, run.settings
    everyone = micro_batch(
        len(run.data.train), seed=settings.seed, index=index, size=settings.batch_size * acc.num_processes
    )
    mine = rank_part(everyone, rank=acc.process_index, world=acc.num_processes)
    batch = prepare_samples(
        run.adapter, [run.data.train[int(i)] for i in mine], run.template, run.data.images
    )
    return batch.to(acc.device, run.inner.get_input_embeddings().weight.dtype)


def _optimizer_step(run: _Run, step: int) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; the mean micro-batch loss over processes."""
    acc, settings = run.accelerator, run.settings
    for group in run.optimizer.param_groups:
        group["lr"] = _lr(step, settings)
    losses = []
    for micro in range(settings.grad_accum):
        batch = _micro_batch(run, step * settings.grad_accum + micro)
        with acc.accumulate(run.model):
            loss = answer_loss(run.model, batch, reduction="sample")
            acc.backward(loss)  # divided by grad_accum; DDP averages over processes at the last micro-batch
            if acc.sync_gradients and settings.clip_grad:
                acc.clip_grad_norm_(run.params, settings.clip_grad)
            run.optimizer.step()  # a no-op until the last micro-batch
            run.optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return float(acc.reduce(torch.stack(losses).mean(), reduction="mean"))


def _validate(run: _Run, state: LoopState) -> None:
    """Record the validation loss; keep the best weights; count validations without improvement."""
    settings, history = run.settings, state.history
    acc = run.accelerator
    batches = run.data.validation_batches(
        run.adapter,
        template=run.template,
        batch_size=settings.batch_size,
        rank=acc.process_index,
        world=acc.num_processes,
    )
    moved = [b.to(acc.device, run.inner.get_input_embeddings().weight.dtype) for b in batches]
    loss = gathered_loss(run.inner, moved, acc, len(run.data.val))
    history.val.append({"step": state.step, "loss": loss})
    if loss < history.best_loss:
        history.best_loss, history.best_step, history.bad_evals = loss, state.step, 0
        state.best = _snapshot(run.inner)
    else:
        history.bad_evals += 1


@contextlib.contextmanager
def _progress_bar(show: bool, total: int, start: int):
    """Yields ``advance(loss, history)``: a step done, on ``mechhi.progress``'s bar (stderr) when ``show``."""
    with progress_bar("fine-tuning", total, show=show, completed=start) as bar:

        def advance(loss: float, history: History) -> None:
            val = f" val {history.val[-1]['loss']:.3f}" if history.val else ""
            bar.advance(1, info=f"loss {loss:.3f}{val}")

        yield advance
