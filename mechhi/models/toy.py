"""The toy model: a small Qwen2-VL (the real transformers classes, so the same adapter
and tracer serve it) with a word-level tokenizer over the world's words, and the
config that defines it and its training run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mechhi.bundled import BUNDLED_MODEL
from mechhi.data.synthetic import COLOURS, SHAPES, SIZES
from mechhi.models import VLMAdapter
from mechhi.models.qwen2_vl import Qwen2VLAdapter
from mechhi.models.tiny import tiny_qwen2_vl

TOY_DIR = BUNDLED_MODEL


TRAIN_SEED_OFFSET = 1_000  # training scenes: world seed = config.seed + this


VISION_SEED_OFFSET = 2_000  # vision-phase scenes: another world, so no scene is seen twice


HELD_OUT_SEED = 99_991  # evaluation scenes are drawn from a world seed training never uses


VQA_TARGET = 0.9  # closed-ended VQA accuracy the toy model is meant to reach


@dataclass(frozen=True)
class ToyConfig:
    """Everything that defines the toy model and its training run."""

    layers: int = 12
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    vision_depth: int = 4
    vision_width: int = 64
    image_size: int = 224  # 8 x 8 visual tokens of 28 px
    # Weight init std. HF's 0.02 leaves a 128-wide model's attention nearly uniform, and
    # learning *where* to look then stalls on a long plateau; ~1/sqrt(2 * hidden) does not.
    init_std: float = 0.06
    # Phase 1: the vision tower alone learns to tell shapes and colours apart from the
    # exact masks (a linear probe on each object's mean token, dropped afterwards). Through
    # the language loss alone a from-scratch ViT learns colour but not shape in the budget;
    # alone it leaves a ~350-step plateau and then reaches ~85% on shapes.
    vision_steps: int = 600
    vision_batch_size: int = 16
    vision_lr: float = 1e-3
    # Phase 2: the whole model on captioning and VQA; the probe loss stays on so that
    # the vision tower keeps the shape information the language loss cannot yet use.
    steps: int = 700
    batch_size: int = 20
    vqa_per_step: int = 16  # of batch_size; the rest are captioned
    caption_only_steps: int = 100  # first learn to read the image, then to answer
    # Share of training-question distractors that are lures: a present object with its
    # colour or its shape changed. With distractors drawn at random, colour alone answers
    # most questions, and a model trained so learnt only colour (it failed exactly when a
    # distractor had a present object's colour: 0.41 there, 1.00 elsewhere). With lures
    # from the start, VQA stayed on its chance plateau for 460 steps (the easy colour
    # cue is the way off it), so lures come in on a ramp over language steps
    # [lure_ramp[0], lure_ramp[1]], from where VQA leaves the plateau.
    lure_share: float = 0.75
    lure_ramp: tuple[int, int] = (200, 450)
    lr: float = 2e-3
    warmup: int = 40
    # Warm-up, constant, then cosine decay over this last share of the language phase.
    # 1.0: a cosine over the whole phase (held at 2e-3 longer, the caption loss stalled).
    decay_share: float = 1.0
    weight_decay: float = 0.01
    visual_probe_weight: float = 1.0
    # A logistic probe on the output of decoder layer ``option_probe_layer`` at each VQA
    # option's last word, trained to say whether that option is in the image (dropped
    # afterwards). The letter loss alone reaches the matching only through the whole
    # circuit (match each option, then copy the matching option's letter), and sat on a
    # chance plateau for hundreds of steps; the probe supervises the first half directly,
    # four labels per question, and leaves the layers above it to the second half.
    option_probe_weight: float = 1.0
    option_probe_layer: int = 5
    seed: int = 0
    checkpoint_every: int = 100
    threads: int = 2

    def __post_init__(self) -> None:
        if not 0 <= self.option_probe_layer < self.layers:
            raise ValueError(
                f"ToyConfig.option_probe_layer={self.option_probe_layer} is not one of {self.layers} layers"
            )

    @classmethod
    def read(cls, path: Path) -> ToyConfig:
        """The config a model was trained with (JSON turns tuples into lists: back again)."""
        raw = json.loads(Path(path).read_text())
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in raw.items()})


def vocabulary() -> list[str]:
    return [*COLOURS, *SHAPES, *SIZES, "and", "What", "Choose", "photo", "shown", "options"]


def build(config: ToyConfig) -> tuple[torch.nn.Module, VLMAdapter]:
    torch.manual_seed(config.seed)
    model, processor = tiny_qwen2_vl(
        words=vocabulary(),
        layers=config.layers,
        heads=config.heads,
        kv_heads=config.kv_heads,
        head_dim=config.head_dim,
        vision_depth=config.vision_depth,
        vision_width=config.vision_width,
        max_pixels=config.image_size**2,
        init_std=config.init_std,
    )
    return model, Qwen2VLAdapter(model.config, processor)
