"""`mechhi zoo train-projector`: LLaVA stage 1 on the toy world, seeded and resumable.

Only ``model.model.multi_modal_projector`` has ``requires_grad``; the loss still reaches
it through the frozen language model's activations (autograd records the LM's ops because
their input, the projected image tokens, requires grad; no LM weight gets a gradient).
The frozen tower's inputs require no grad, so autograd records nothing inside it: its
forward costs what inference costs. Each scene is seen once, so caching the tower's
features would save nothing more.

Every batch is a pure function of (seed, step), so a resumed run sees exactly the scenes
an uninterrupted one would, and ends with the same weights.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mechhi.data.synthetic import WorldConfig, render_one
from mechhi.data.vqa import LETTERS, format_options
from mechhi.finetune.loss import answer_loss
from mechhi.models import PreparedBatch, VLMAdapter
from mechhi.models.toy import TRAIN_SEED_OFFSET
from mechhi.models.zoo.build import PROJECTOR_CONFIG as CONFIG_FILE
from mechhi.models.zoo.build import PROJECTOR_FILE
from mechhi.progress import progress_bar
from mechhi.toyworld.curriculum import caption_of, training_question

LOG_FILE = "training_log.jsonl"
CHECKPOINT_FILE = "projector_checkpoint.pt"


@dataclass(frozen=True)
class ProjectorConfig:
    """Everything that defines one stage-1 run."""

    steps: int = 300
    batch_size: int = 8
    vqa_per_step: int = 2  # of batch_size; the rest are captioned
    lure_share: float = 0.5  # training-question distractors that are one attribute from a present object
    lr: float = 1e-3  # LLaVA-1.5's stage-1 learning rate
    warmup: int = 10
    weight_decay: float = 0.0
    image_size: int = 224  # the world renders at this size; the processor resizes to its crop
    # The processor's crop in pixels while training (None: the built folder's own). The
    # projector is per token, so it serves any crop; a smaller one cuts the frozen LM's
    # cost per sample (112 px: 8 x 8 = 64 image tokens instead of 256 at 224 px).
    crop_size: int | None = None
    seed: int = 0
    checkpoint_every: int = 10
    threads: int = 2

    def __post_init__(self) -> None:
        if not 0 <= self.vqa_per_step <= self.batch_size:
            raise ValueError(
                f"ProjectorConfig.vqa_per_step={self.vqa_per_step} is not in 0..{self.batch_size}"
            )

    @classmethod
    def read(cls, path: Path) -> ProjectorConfig:
        return cls(**json.loads(Path(path).read_text()))


def learning_rate(step: int, config: ProjectorConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine to zero at the last step."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def freeze_all_but_projector(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Set ``requires_grad`` on the projector's parameters only; return them."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trained = list(model.model.multi_modal_projector.parameters())
    for parameter in trained:
        parameter.requires_grad_(True)
    return trained


def use_crop(adapter: VLMAdapter, crop: int | None) -> None:
    """Make the adapter's image processor resize the short side to ``crop`` and centre-crop
    ``crop`` x ``crop`` (the LLaVA processor counts image tokens from the pixels it gets)."""
    if crop is None:
        return
    image_processor = adapter.processor.image_processor
    image_processor.size = {"shortest_edge": crop}
    image_processor.crop_size = {"height": crop, "width": crop}


def step_batches(adapter: VLMAdapter, config: ProjectorConfig, step: int) -> dict[str, PreparedBatch]:
    """The captioned and the VQA batch of one step: a pure function of (seed, step);
    scene indices are disjoint across steps, so no scene is seen twice."""
    world = WorldConfig(image_size=config.image_size)
    rng = np.random.default_rng([config.seed, step])
    first = step * config.batch_size
    drawn = [
        render_one(first + k, seed=config.seed + TRAIN_SEED_OFFSET, config=world)
        for k in range(config.batch_size)
    ]
    n_caption = config.batch_size - config.vqa_per_step
    batches = {}
    if n_caption:
        batches["caption"] = adapter.prepare(
            [im for _, im in drawn[:n_caption]], [caption_of(r) for r, _ in drawn[:n_caption]]
        )
    if config.vqa_per_step:
        questions = [
            training_question(r, im, rng, lure_share=config.lure_share, world=world)
            for r, im in drawn[n_caption:]
        ]
        batches["vqa"] = adapter.prepare(
            [q.image for q in questions],
            [LETTERS[q.answer] for q in questions],
            template="vqa",
            fields=[{"options": format_options(q.options)} for q in questions],
        )
    return batches


def train_projector(
    model: torch.nn.Module,
    adapter: VLMAdapter,
    config: ProjectorConfig,
    out_dir: Path,
    *,
    progress: bool = True,
    stop_after: int | None = None,
    max_minutes: float | None = None,
) -> Path:
    """Train ``model``'s projector in place; write ``projector.safetensors`` (the state dict
    of ``model.model.multi_modal_projector``, what `mechhi zoo build --projector trained`
    loads), the training log and config into ``out_dir``. Resumes from the checkpoint
    there; ``stop_after`` ends the run after that step as a kill would (checkpoint kept);
    ``max_minutes`` does the same once the run's wall time (across resumes) passes it."""
    from safetensors.torch import save_file

    torch.set_num_threads(config.threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint, log_path = out_dir / CHECKPOINT_FILE, out_dir / LOG_FILE
    projector = model.model.multi_modal_projector
    use_crop(adapter, config.crop_size)
    trained = freeze_all_but_projector(model)
    model.eval()  # no dropout: the frozen parts behave as at inference
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
    start, elapsed = 0, 0.0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        if state["config"] != asdict(config):
            raise ValueError(
                f"{checkpoint} was written with another ProjectorConfig; delete it to start over"
            )
        projector.load_state_dict(state["projector"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed = state["step"], state["seconds"]
        kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= start]
        log_path.write_text("".join(line + "\n" for line in kept))
    elif log_path.exists():
        log_path.unlink()
    (out_dir / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")
    began = time.time() - elapsed
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    with (
        open(log_path, "a") as log,
        progress_bar("projector", config.steps, show=progress, completed=start) as bar,
    ):
        for step in range(start, end):
            batches = step_batches(adapter, config, step)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config)
            optimizer.zero_grad(set_to_none=True)
            losses = {}
            for name, batch in batches.items():
                loss = answer_loss(model, batch)
                (loss / len(batches)).backward()
                losses[f"{name}_loss"] = loss.item()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            entry = {
                "step": step + 1,
                **losses,
                "lr": learning_rate(step, config),
                "seconds": round(time.time() - began, 1),
            }
            log.write(json.dumps(entry) + "\n")
            log.flush()
            bar.advance(1, info=" ".join(f"{k} {v:.3f}" for k, v in losses.items()))
            out_of_time = max_minutes is not None and time.time() - began > 60 * max_minutes
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == end or out_of_time:
                staging = checkpoint.with_suffix(".tmp")  # write then rename: a kill never leaves half a file
                torch.save(
                    {
                        "projector": projector.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "step": step + 1,
                        "seconds": time.time() - began,
                        "config": asdict(config),
                    },
                    staging,
                )
                os.replace(staging, checkpoint)
                save_file(
                    {k: v.detach().contiguous() for k, v in projector.state_dict().items()},
                    out_dir / PROJECTOR_FILE,
                )
            if out_of_time:
                break
    return out_dir / PROJECTOR_FILE
