"""Resumable training state on disk: accelerate's ``save_state`` / ``load_state`` in
directories that appear whole or not at all.

accelerate writes a checkpoint file by file (optimizer, RNG state of every process,
registered objects), so a kill mid-save leaves a half directory. Each checkpoint is
therefore written to ``step-N.partial``, renamed to ``step-N`` once every process has
written its part, and only then named in ``latest.json`` (itself written to a temporary
file and renamed). A run resumes from the directory ``latest.json`` names, or starts
afresh when there is none; anything else in the folder is an unfinished save and is
deleted by the next one.

The model's weights are not accelerate's to save: the base model never changes, and
saving it would copy gigabytes per checkpoint. The save/load hooks write and read only
the trainable (LoRA) parameters, checked name by name on load.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

LATEST = "latest.json"
WEIGHTS = "trainable.safetensors"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class Checkpoints:
    """The checkpoints of one run in ``root``, for every process of ``accelerator``."""

    def __init__(self, root: Path, accelerator: Any, run_id: str) -> None:
        self.root, self.accelerator, self.run_id = Path(root), accelerator, run_id
        accelerator.register_save_state_pre_hook(self._save_trainable)
        accelerator.register_load_state_pre_hook(self._load_trainable)

    def latest(self) -> dict[str, Any] | None:
        path = self.root / LATEST
        return json.loads(path.read_text()) if path.is_file() else None

    def resume(self) -> int:
        """Load the latest complete checkpoint; the step it was taken after (0: none)."""
        latest = self.latest()
        if latest is None:
            return 0
        if latest["run_id"] != self.run_id:
            raise ValueError(
                f"{self.root} holds a checkpoint of another fine-tuning run; delete it to start over"
            )
        if latest["processes"] != self.accelerator.num_processes:
            raise ValueError(
                f"{self.root} was written by {latest['processes']} processes; resume it with as many "
                f"(this run has {self.accelerator.num_processes}) or delete it to start over"
            )
        self.accelerator.load_state(str(self.root / latest["dir"]))
        return int(latest["step"])

    def save(self, step: int) -> None:
        """A complete checkpoint after ``step``, then the older ones removed."""
        acc, name = self.accelerator, f"step-{step:08d}"
        partial, final = self.root / f"{name}.partial", self.root / name
        if acc.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(partial))
        acc.wait_for_everyone()  # every process has written its part
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            _write_atomic(
                self.root / LATEST,
                json.dumps({"dir": name, "step": step, "run_id": self.run_id, "processes": acc.num_processes})
                + "\n",
            )
            for other in self.root.iterdir():
                if other.is_dir() and other.name != name:
                    shutil.rmtree(other)
        acc.wait_for_everyone()

    def _save_trainable(self, models: list, weights: list, output_dir: str) -> None:
        """accelerate's save hook: instead of full model state dicts, the trainable parameters."""
        from safetensors.torch import save_file

        weights.clear()
        if self.accelerator.is_main_process:
            for i, model in enumerate(models):
                tensors = {
                    n: p.detach().cpu().contiguous()
                    for n, p in _trainable(self.accelerator.unwrap_model(model)).items()
                }
                save_file(tensors, os.path.join(output_dir, f"{i}-{WEIGHTS}"))

    def _load_trainable(self, models: list, input_dir: str) -> None:
        """accelerate's load hook: the trainable parameters back, every name accounted for."""
        from safetensors.torch import load_file

        for i, model in enumerate(models):
            saved = load_file(os.path.join(input_dir, f"{i}-{WEIGHTS}"))
            params = _trainable(self.accelerator.unwrap_model(model))
            if sorted(saved) != sorted(params):
                raise ValueError(f"{input_dir}: the checkpoint's trainable weights do not match the model's")
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)
        models.clear()  # loaded here: accelerate must not look for full state dicts
