"""`mechhi toy train`: the toy model's two training phases (the vision tower alone, then
the whole model on captions and questions), seeded, checkpointed, resumable."""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch

from mechhi.finetune.loss import answer_loss
from mechhi.models.toy import TOY_DIR, ToyConfig, build
from mechhi.progress import progress_bar
from mechhi.toyworld.curriculum import (
    OptionProbe,
    TrainBatch,
    VisualProbe,
    labels_from_answer,
    training_batches,
    vision_batch,
)


def _lr(step: int, config: ToyConfig) -> float:
    """Learning rate at a global step: warm-up then constant in the vision phase; in the
    language phase warm-up, constant, then cosine to zero over its last ``decay_share``."""
    if step < config.vision_steps:
        return config.vision_lr * min(1.0, (step + 1) / config.warmup)
    step -= config.vision_steps
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    decay_steps = max(1, round(config.decay_share * config.steps))
    progress = max(0.0, (step - (config.steps - decay_steps)) / decay_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def train(config: ToyConfig = ToyConfig(), *, out_dir: Path = TOY_DIR, progress: bool = True) -> Path:
    """Train the toy model into ``out_dir`` (weights, tokenizer, processor, training log)."""
    torch.set_num_threads(config.threads)
    out_dir = Path(out_dir)
    checkpoint = out_dir / "checkpoint.pt"
    log_path = out_dir / "training_log.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    model, adapter = build(config)
    model.train()
    probe = VisualProbe(model.config.text_config.hidden_size)
    option_probe = OptionProbe(model.config.text_config.hidden_size)
    visual_tokens: list[torch.Tensor] = []  # the vision tower's output in the current forward
    model.model.visual.register_forward_hook(lambda _m, _i, out: visual_tokens.append(out.pooler_output))
    probed: list[torch.Tensor] = []  # decoder layer option_probe_layer's output in the current forward
    model.model.language_model.layers[config.option_probe_layer].register_forward_hook(
        lambda _m, _i, out: probed.append(out[0] if isinstance(out, tuple) else out)
    )
    trained = [*model.parameters(), *probe.parameters(), *option_probe.parameters()]
    # One optimizer for both phases: in the vision phase the language model has no
    # gradients, and AdamW leaves parameters without gradients untouched.
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=config.weight_decay)
    total = config.vision_steps + config.steps
    start, elapsed = 0, 0.0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        if state["config"] != asdict(config):
            raise ValueError(f"{checkpoint} was written with another ToyConfig; delete it to start over")
        model.load_state_dict(state["model"])
        probe.load_state_dict(state["probe"])
        option_probe.load_state_dict(state["option_probe"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed = state["step"], state.get("seconds", 0.0)
        # Steps after the checkpoint are done again: drop their log lines.
        kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= start]
        log_path.write_text("".join(line + "\n" for line in kept))
    elif log_path.exists():
        log_path.unlink()
    began = time.time() - elapsed  # wall time across resumes

    def batches_of(step: int) -> TrainBatch | dict[str, TrainBatch]:
        if step < config.vision_steps:
            return vision_batch(adapter, config, step)
        return training_batches(adapter, config, step - config.vision_steps)

    # Scenes for the next step are drawn and prepared in a thread while this step computes
    # (~8% of wall time; rendering and the processor release the GIL for much of it).
    # Batches are a pure function of the step, so this changes no number.
    with (
        progress_bar("training", total, show=progress, completed=start) as bar,
        open(log_path, "a") as log,
        ThreadPoolExecutor(max_workers=1) as prefetch,
    ):
        upcoming = prefetch.submit(batches_of, start)
        for step in range(start, total):
            prepared = upcoming.result()
            if step + 1 < total:
                upcoming = prefetch.submit(batches_of, step + 1)
            for group in optimizer.param_groups:
                group["lr"] = _lr(step, config)
            optimizer.zero_grad(set_to_none=True)
            losses = {}
            if isinstance(prepared, TrainBatch):  # vision phase
                batch = prepared
                inputs = batch.prepared.inputs
                tokens = model.model.visual(
                    inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]
                ).pooler_output
                visual_tokens.clear()
                loss = probe.loss(tokens, batch)
                loss.backward()
                losses["visual_probe_loss"] = loss.item()
            else:
                batches = prepared
                for name, batch in batches.items():
                    visual_tokens.clear()
                    probed.clear()
                    loss = answer_loss(model, batch.prepared, labels_from_answer(batch.prepared))
                    probe_loss = probe.loss(visual_tokens[0], batch)
                    total_loss = loss + config.visual_probe_weight * probe_loss
                    if batch.option_index is not None:
                        option_loss = option_probe.loss(probed[0], batch)
                        total_loss = total_loss + config.option_probe_weight * option_loss
                        losses[f"{name}_option_probe_loss"] = option_loss.item()
                    (total_loss / len(batches)).backward()
                    losses[f"{name}_loss"] = loss.item()
                    losses[f"{name}_visual_probe_loss"] = probe_loss.item()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            phase = "vision" if step < config.vision_steps else "language"
            entry = {
                "step": step + 1,
                "phase": phase,
                **losses,
                "lr": _lr(step, config),
                "seconds": round(time.time() - began, 1),
            }
            log.write(json.dumps(entry) + "\n")
            log.flush()
            bar.advance(1, info=" ".join(f"{k} {v:.3f}" for k, v in losses.items()))
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < total:
                staging = checkpoint.with_suffix(".tmp")  # write then rename: a kill never leaves half a file
                torch.save(
                    {
                        "model": model.state_dict(),
                        "probe": probe.state_dict(),
                        "option_probe": option_probe.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "step": step + 1,
                        "seconds": time.time() - began,
                        "config": asdict(config),
                    },
                    staging,
                )
                os.replace(staging, checkpoint)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    adapter.processor.save_pretrained(out_dir)
    (out_dir / "toy_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    checkpoint.unlink(missing_ok=True)
    return out_dir
