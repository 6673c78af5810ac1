"""The bundled toy model: a small Qwen2-VL trained from scratch on the synthetic world.

No real checkpoint can be downloaded here, and a random model has no heads that look at
objects, so mechhi ships one it trained itself. It uses the real transformers
Qwen2-VL classes (so the same adapter and tracer serve it) with a word-level tokenizer,
and it learns two tasks on synthetic scenes:

- captioning with the paper's template: "What is this photo?" -> "This is a photo of
  a red circle and a blue square." (objects left to right);
- closed-ended VQA with four options (one object of the image, three absent) -> "B.".

Training is seeded and streams freshly generated scenes, so no image is seen twice;
checkpoints are written every `checkpoint_every` steps and a rerun resumes from the
last one.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.format import ImageRecord
from ..data.synthetic import COLOURS, SHAPES, SIZES, WorldConfig, all_descriptions, describe, render_one
from ..evaluate import LETTERS, VQAItem, answer_predictions, format_options
from ..finetune import answer_loss
from ..models import PreparedBatch, VLMAdapter
from ..models.qwen2_vl import Qwen2VLAdapter

ZOO_DIR = Path(__file__).resolve().parent
TOY_DIR = ZOO_DIR / "toy-qwen2vl"
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
            raise ValueError(f"ToyConfig.option_probe_layer={self.option_probe_layer} is not one of {self.layers} layers")

    @classmethod
    def read(cls, path: Path) -> ToyConfig:
        """The config a model was trained with (JSON turns tuples into lists: back again)."""
        raw = json.loads(Path(path).read_text())
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in raw.items()})


def vocabulary() -> list[str]:
    return [*COLOURS, *SHAPES, *SIZES, "and", "What", "Choose", "photo", "shown", "options"]


def build(config: ToyConfig) -> tuple[torch.nn.Module, VLMAdapter]:
    torch.manual_seed(config.seed)
    model, processor = Qwen2VLAdapter.build_tiny(
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


# ----------------------------------------------------------------------------- data


def caption_of(record: ImageRecord) -> str:
    """Descriptions of every object, left to right, joined by "and"."""

    def centre_x(obj) -> float:
        return float(np.flatnonzero(obj.mask().any(axis=0)).mean())

    return " and ".join(o.description for o in sorted(record.objects, key=centre_x))


def vqa_item(record: ImageRecord, image, rng: np.random.Generator) -> VQAItem:
    """One of the world's own questions (distractors drawn at random): what evaluation asks."""
    question = record.questions[int(rng.integers(len(record.questions)))]
    return VQAItem(image=image, options=tuple(question["options"]), answer=int(question["answer"]))


def lures(record: ImageRecord, world: WorldConfig) -> dict[str, list[str]]:
    """Absent descriptions one attribute away from a present object: its shape changed
    (colour alone cannot rule these out) or its colour changed (shape alone cannot)."""
    present = {(o.attributes["colour"], o.attributes["shape"]) for o in record.objects}
    same_colour = {(colour, s) for colour, _ in present for s in world.shapes}
    same_shape = {(c, shape) for _, shape in present for c in world.colours}
    return {
        "same colour": sorted(describe(c, s) for c, s in same_colour - present),
        "same shape": sorted(describe(c, s) for c, s in same_shape - present),
    }


def training_question(
    record: ImageRecord, image, rng: np.random.Generator, *, lure_share: float, world: WorldConfig
) -> VQAItem:
    """A question about a random object; each distractor is, with probability
    ``lure_share``, a lure of either kind (even odds), otherwise any absent description."""
    target = record.objects[int(rng.integers(len(record.objects)))]
    present = {o.description for o in record.objects}
    kinds = [pool for pool in lures(record, world).values() if pool]
    anything = [d for d in all_descriptions(world) if d not in present]
    distractors: list[str] = []
    while len(distractors) < 3:
        pool = kinds[int(rng.integers(len(kinds)))] if kinds and rng.random() < lure_share else anything
        pick = pool[int(rng.integers(len(pool)))]
        if pick not in distractors:
            distractors.append(pick)
    options = [target.description, *distractors]
    order = rng.permutation(4)
    return VQAItem(image=image, options=tuple(options[i] for i in order), answer=int(np.flatnonzero(order == 0)[0]))


def labels_from_answer(batch: PreparedBatch) -> torch.Tensor:
    """Train on the answer and everything after it in the sequence (its "." and end token)."""
    ids = batch.inputs["input_ids"]
    valid = batch.inputs["attention_mask"].bool()
    labels = torch.full_like(ids, -100)
    for i, layout in enumerate(batch.layouts):
        start = int(layout.query_positions[0])
        labels[i, start:] = torch.where(valid[i, start:], ids[i, start:], -100)
    return labels


@dataclass
class TrainBatch:
    """A prepared batch and, per object, its coverage of the vision tower's tokens and its class."""

    prepared: PreparedBatch
    object_weights: torch.Tensor  # (n_objects, n_visual_tokens): coverage, each row sums to 1
    object_shape: torch.Tensor  # (n_objects,) index into SHAPES
    object_colour: torch.Tensor  # (n_objects,) index into COLOURS
    # VQA batches only: (sample, position) of each option's last word, and whether it is present
    option_index: torch.Tensor | None = None  # (n_options, 2) long
    option_present: torch.Tensor | None = None  # (n_options,) float 0/1


def with_object_labels(batch: PreparedBatch, records: list[ImageRecord]) -> TrainBatch:
    """Attach each object's coverage of the visual tokens, in the order the vision tower
    emits them (sample by sample, row-major over its grid), and its shape and colour."""
    n_tokens = sum(len(view.positions) for layout in batch.layouts for view in layout.views)
    rows, shapes, colours, start = [], [], [], 0
    for layout, record in zip(batch.layouts, records, strict=True):
        (view,) = layout.views
        for obj in record.objects:
            colour, shape = obj.attributes["colour"], obj.attributes["shape"]
            cover = view.coverage(obj.mask()).ravel()
            weights = np.zeros(n_tokens, dtype=np.float32)
            weights[start : start + len(cover)] = cover / cover.sum()
            rows.append(weights)
            shapes.append(SHAPES.index(shape))
            colours.append(list(COLOURS).index(colour))
        start += len(view.positions)
    return TrainBatch(batch, torch.from_numpy(np.stack(rows)), torch.tensor(shapes), torch.tensor(colours))


class VisualProbe(torch.nn.Module):
    """Linear shape and colour classifiers on each object's coverage-weighted mean token.

    Per object, not per token: an interior token of a large object cannot show its
    shape on its own, the object's tokens together can."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.shape = torch.nn.Linear(hidden, len(SHAPES))
        self.colour = torch.nn.Linear(hidden, len(COLOURS))

    def loss(self, visual_tokens: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
        pooled = batch.object_weights @ visual_tokens
        ce = torch.nn.functional.cross_entropy
        return ce(self.shape(pooled).float(), batch.object_shape) + ce(self.colour(pooled).float(), batch.object_colour)


def option_last_words(adapter: VLMAdapter, batch: PreparedBatch) -> np.ndarray:
    """(B, 4) position of each option's last word in each VQA prompt.

    An option runs from its letter ("A" then ")") to the token before the next letter,
    or, for the last one, before the end of the user turn."""
    tokenizer = adapter.tokenizer
    letters = tokenizer.convert_tokens_to_ids(list(LETTERS))
    close, end = tokenizer.convert_tokens_to_ids([")", "<|im_end|>"])
    out = np.zeros((len(batch.layouts), len(LETTERS)), dtype=np.int64)
    for i, layout in enumerate(batch.layouts):
        ids = batch.inputs["input_ids"][i, : int(layout.query_positions[0])].numpy()
        starts = [int(np.flatnonzero((ids[:-1] == letter) & (ids[1:] == close))[-1]) for letter in letters]
        turn_ends = np.flatnonzero(ids == end)
        ends = [*starts[1:], int(turn_ends[turn_ends > starts[-1]][0])]
        out[i] = np.asarray(ends) - 1
    return out


class OptionProbe(torch.nn.Module):
    """Logistic "is this option in the image?" on a middle layer's state at each option's last word."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.present = torch.nn.Linear(hidden, 1)

    def loss(self, hidden_states: torch.Tensor, batch: TrainBatch) -> torch.Tensor:
        picked = hidden_states[batch.option_index[:, 0], batch.option_index[:, 1]]  # (n_options, hidden)
        logits = self.present(picked).float().squeeze(-1)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.option_present)


def _captions(adapter: VLMAdapter, scenes: list) -> TrainBatch:
    prepared = adapter.prepare([im for _, im in scenes], [caption_of(r) for r, _ in scenes])
    return with_object_labels(prepared, [r for r, _ in scenes])


def vision_batch(adapter: VLMAdapter, config: ToyConfig, step: int) -> TrainBatch:
    """Scenes of one vision-phase step (captions are prepared but only the image is used)."""
    world = WorldConfig(image_size=config.image_size)
    first = step * config.vision_batch_size
    seed = config.seed + VISION_SEED_OFFSET
    return _captions(adapter, [render_one(first + k, seed=seed, config=world) for k in range(config.vision_batch_size)])


def training_batches(adapter: VLMAdapter, config: ToyConfig, step: int) -> dict[str, TrainBatch]:
    """The batches of one language-phase step, a pure function of (seed, step) so that
    resume is exact: ``vqa_per_step`` VQA questions and the rest captioned, except in the
    first ``caption_only_steps``, where all are captioned."""
    rng = np.random.default_rng([config.seed, step])
    world = WorldConfig(image_size=config.image_size)
    first = step * config.batch_size  # scene indices are disjoint across steps: no image is seen twice
    drawn = [render_one(first + k, seed=config.seed + TRAIN_SEED_OFFSET, config=world) for k in range(config.batch_size)]
    if step < config.caption_only_steps:
        half = config.batch_size // 2
        return {"caption": _captions(adapter, drawn[:half]), "caption_2": _captions(adapter, drawn[half:])}
    n_caption = config.batch_size - config.vqa_per_step
    asked = drawn[n_caption:]
    share = lure_share_at(step, config)
    questions = [training_question(r, im, rng, lure_share=share, world=world) for r, im in asked]
    vqa = adapter.prepare(
        [q.image for q in questions],
        [LETTERS[q.answer] for q in questions],
        template="vqa",
        fields=[{"options": format_options(q.options)} for q in questions],
    )
    labelled = with_object_labels(vqa, [r for r, _ in asked])
    positions = option_last_words(adapter, vqa)  # (B, 4)
    labelled.option_index = torch.tensor([(i, int(pos)) for i, row in enumerate(positions) for pos in row])
    labelled.option_present = torch.tensor([float(k == q.answer) for q in questions for k in range(len(LETTERS))])
    return {"caption": _captions(adapter, drawn[:n_caption]), "vqa": labelled}


def lure_share_at(step: int, config: ToyConfig) -> float:
    """The lure share at a language step: 0 before the ramp, ``lure_share`` after it, linear between."""
    start, end = config.lure_ramp
    return config.lure_share * min(1.0, max(0.0, (step - start) / max(1, end - start)))


# ----------------------------------------------------------------------------- training


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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

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
        lambda _m, _i, out: probed.append(out[0] if isinstance(out, tuple) else out))
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
    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
               TimeRemainingColumn())  # fmt: skip
    began = time.time() - elapsed  # wall time across resumes

    def batches_of(step: int) -> TrainBatch | dict[str, TrainBatch]:
        if step < config.vision_steps:
            return vision_batch(adapter, config, step)
        return training_batches(adapter, config, step - config.vision_steps)

    # Scenes for the next step are drawn and prepared in a thread while this step computes
    # (~8% of wall time; rendering and the processor release the GIL for much of it).
    # Batches are a pure function of the step, so this changes no number.
    with Progress(*columns, disable=not progress) as bar, open(log_path, "a") as log, \
            ThreadPoolExecutor(max_workers=1) as prefetch:  # fmt: skip
        task = bar.add_task("train", total=total, completed=start, loss="")
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
                tokens = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
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
            entry = {"step": step + 1, "phase": phase, **losses, "lr": _lr(step, config),
                     "seconds": round(time.time() - began, 1)}  # fmt: skip
            log.write(json.dumps(entry) + "\n")
            log.flush()
            bar.update(task, advance=1, loss=" ".join(f"{k} {v:.3f}" for k, v in losses.items()))
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < total:
                staging = checkpoint.with_suffix(".tmp")  # write then rename: a kill never leaves half a file
                torch.save({"model": model.state_dict(), "probe": probe.state_dict(), "option_probe": option_probe.state_dict(), "optimizer": optimizer.state_dict(),
                            "step": step + 1, "seconds": time.time() - began, "config": asdict(config)}, staging)  # fmt: skip
                os.replace(staging, checkpoint)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    adapter.processor.save_pretrained(out_dir)
    (out_dir / "toy_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    checkpoint.unlink(missing_ok=True)
    return out_dir


# ----------------------------------------------------------------------------- quality


def held_out(n_images: int, config: ToyConfig) -> list[tuple[ImageRecord, object]]:
    world = WorldConfig(image_size=config.image_size)
    return [render_one(i, seed=HELD_OUT_SEED, config=world) for i in range(n_images)]


def measure(
    model: torch.nn.Module, adapter: VLMAdapter, *, n_images: int = 200, config: ToyConfig = ToyConfig()
) -> dict[str, dict[str, float]]:
    """Caption token accuracy and perplexity, VQA accuracy and AnsProb on held-out scenes."""
    from ..evaluate import Metric, closed_vqa, perplexity_of, scores_of

    scenes = held_out(n_images, config)
    images = [im for _, im in scenes]
    predictions = list(answer_predictions(model, adapter, images, [caption_of(r) for r, _ in scenes], batch_size=16))
    nll, accuracy = scores_of(predictions)
    rng = np.random.default_rng(HELD_OUT_SEED)
    items = [vqa_item(r, im, rng) for r, im in scenes]
    vqa = closed_vqa(model, adapter, items, batch_size=16)
    # The questions colour alone cannot answer: a distractor has a present object's colour.
    world = WorldConfig(image_size=config.image_size)
    lured = [item for item, (record, _) in zip(items, scenes, strict=True)
             if set(item.options) & set(lures(record, world)["same colour"])]  # fmt: skip
    return {
        "caption_token_accuracy": Metric.of(accuracy).as_dict(),
        "caption_perplexity": perplexity_of(nll).as_dict(),
        "vqa_accuracy": vqa["accuracy"].as_dict(),
        "vqa_ans_prob": vqa["ans_prob"].as_dict(),
        "vqa_accuracy_same_colour_lure": closed_vqa(model, adapter, lured, batch_size=16)["accuracy"].as_dict(),
        "vqa_questions_same_colour_lure": len(lured),
        "caption_word_accuracy": word_accuracy(adapter, predictions),
    }


def word_accuracy(adapter: VLMAdapter, predictions: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Teacher-forced caption accuracy split by word kind, from `answer_predictions`: a
    colour is visible in any one token of an object, a shape only in how its tokens fit
    together, so the two tell apart what the vision pathway has learnt."""
    hits: dict[str, list[bool]] = {"colour": [], "shape": [], "other": []}
    for predicted, target in predictions:
        for word, hit in zip(adapter.tokenizer.convert_ids_to_tokens(target.tolist()),
                             (predicted.argmax(-1) == target).tolist(), strict=True):  # fmt: skip
            hits["colour" if word in COLOURS else "shape" if word in SHAPES else "other"].append(hit)
    return {kind: float(np.mean(h)) for kind, h in hits.items() if h}


def head_impact_summary(
    model: torch.nn.Module, adapter: VLMAdapter, workdir: Path, *, n_images: int = 30, name: str = "model"
) -> dict[str, float]:
    """Trace held-out scenes and summarise Head Impact: best layer, best head, overall mean."""
    from probes.head_impact import layer_ranking, score_store

    from ..data.synthetic import build_synthetic
    from ..trace.job import TraceConfig, trace_dataset

    data = workdir / "held-out"
    if not (data / "annotations.jsonl").exists():
        build_synthetic(data, n_images=n_images, seed=HELD_OUT_SEED, splits={"trace": 1.0}, progress=False)
    store = trace_dataset(TraceConfig(dataset=str(data), store=str(workdir / f"{name}.zarr"), batch_size=8),
                          progress=False, loaded=(model, adapter))  # fmt: skip
    scores = score_store(store)
    ranking = layer_ranking(scores)
    hi = scores.head_impact
    return {
        "best_layer": int(ranking.layer[0]),
        "best_layer_mean_hi": float(ranking[0]),
        "best_head_hi": float(hi.max()),
        "mean_hi": float(hi.mean()),
        "top4_layers": [int(x) for x in ranking.layer[:4]],
    }


def card_metrics(out_dir: Path = TOY_DIR, *, n_images: int = 200, hi_images: int = 30) -> dict:
    """Everything the model card reports, measured now on held-out scenes."""
    import tempfile

    from ..models.loading import load

    config = ToyConfig.read(Path(out_dir) / "toy_config.json")
    model, adapter = load(out_dir, device="cpu", dtype="float32")
    random_model, random_adapter = build(config)
    log = [json.loads(line) for line in (Path(out_dir) / "training_log.jsonl").read_text().splitlines()]

    def last(key: str) -> float | None:  # the phases log different losses; a short run may lack some
        return next((entry[key] for entry in reversed(log) if key in entry), None)

    with tempfile.TemporaryDirectory() as tmp:
        metrics = {
            "trained": measure(model, adapter, n_images=n_images, config=config),
            "random_init": measure(random_model.eval(), random_adapter, n_images=n_images, config=config),
            "head_impact_trained": head_impact_summary(model, adapter, Path(tmp), n_images=hi_images, name="trained"),
            "head_impact_random": head_impact_summary(random_model, random_adapter, Path(tmp), n_images=hi_images,
                                                      name="random"),
        }  # fmt: skip
    metrics["training"] = {"config": asdict(config), "minutes": round(log[-1]["seconds"] / 60, 1),
                           "final_caption_loss": last("caption_loss"), "final_vqa_loss": last("vqa_loss")}  # fmt: skip
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    metrics["held_out"] = {"seed": HELD_OUT_SEED, "images": n_images, "hi_images": hi_images}
    return metrics


def write_card(metrics: dict, out_dir: Path = TOY_DIR) -> Path:
    """The model card (README.md) with the measured numbers, and the same as JSON."""
    (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    t, r = metrics["trained"], metrics["random_init"]
    ht, hr = metrics["head_impact_trained"], metrics["head_impact_random"]

    tw, rw = t["caption_word_accuracy"], r["caption_word_accuracy"]
    c = metrics["training"]["config"]
    mix = f"{c['batch_size'] - c['vqa_per_step']} captioned + {c['vqa_per_step']} VQA per step"
    if c["caption_only_steps"]:
        mix = f"captioning only for the first {c['caption_only_steps']} steps, then {mix}"
    limitations = ""
    if t["vqa_accuracy"]["mean"] < VQA_TARGET:
        limitations = f"""## Known limitations

Closed-ended VQA accuracy is {t["vqa_accuracy"]["mean"]:.2f}, below the {VQA_TARGET:.0%} target. The misses
concentrate on questions where a distractor has the colour of an object in the image
(accuracy {t["vqa_accuracy_same_colour_lure"]["mean"]:.2f} there): telling shapes apart is what the 30-minute CPU budget
leaves least trained.

"""

    def fmt(m: dict, digits: int = 3) -> str:
        return f"{m['mean']:.{digits}f} ± {m['se']:.{digits}f}"

    text = f"""# toy-qwen2vl: the bundled toy model of mechhi

A {metrics["parameters"] / 1e6:.2f} M-parameter model of the real transformers class
`Qwen2VLForConditionalGeneration` (12 decoder layers, hidden 128, 4 heads with 2 KV heads,
4-layer vision tower, word-level tokenizer), trained from scratch by `mechhi toy train` on
scenes of the synthetic world (`mechhi/data/synthetic.py`): 1-3 coloured shapes on varied
backgrounds at 224 px (8 x 8 visual tokens).

Tasks (the paper's prompts): captioning, "What is this photo?" -> "This is a photo of a
red circle and a blue square." (objects left to right), and closed-ended VQA with four
options -> "B.". Training, seeded, never the same scene twice, {metrics["training"]["minutes"]} minutes
on 2 CPU cores (`training_log.jsonl`):

1. vision phase, {c["vision_steps"]} steps of {c["vision_batch_size"]} scenes: the vision tower alone, with a
   linear probe that classifies each object's shape and colour from its mask-weighted
   mean visual token (the probe is dropped afterwards; the shipped model is a plain
   Qwen2-VL);
2. language phase, {c["steps"]} steps of {c["batch_size"]} scenes: {mix}, the probe loss kept on.
   Training questions draw each distractor, with a probability rising from 0 to {c["lure_share"]} over
   language steps {c["lure_ramp"][0]}-{c["lure_ramp"][1]}, from the lures of the scene (a present object with its
   shape or its colour changed), so that colour alone cannot answer them; evaluation asks
   the world's own questions (distractors at random). A second probe, also dropped
   afterwards, reads decoder layer {c["option_probe_layer"]} at each option's last word and is trained to say
   whether that option is in the image. In two development runs otherwise alike (24
   questions per step; their logs are not shipped), VQA left its chance plateau after about
   190 language steps with this probe and after about 450 without it.

## Quality on held-out scenes (world seed {metrics["held_out"]["seed"]}, {metrics["held_out"]["images"]} images; mean ± SE)

| metric | trained | random init |
|---|---|---|
| caption answer-token accuracy | {fmt(t["caption_token_accuracy"])} | {fmt(r["caption_token_accuracy"])} |
| caption perplexity (answer tokens) | {fmt(t["caption_perplexity"], 2)} | {fmt(r["caption_perplexity"], 2)} |
| closed-ended VQA accuracy | {fmt(t["vqa_accuracy"])} | {fmt(r["vqa_accuracy"])} |
| VQA accuracy, questions with a same-colour lure ({t["vqa_questions_same_colour_lure"]}) | {fmt(t["vqa_accuracy_same_colour_lure"])} | {fmt(r["vqa_accuracy_same_colour_lure"])} |
| VQA AnsProb | {fmt(t["vqa_ans_prob"])} | {fmt(r["vqa_ans_prob"])} |
| caption colour-word accuracy | {tw["colour"]:.3f} | {rw["colour"]:.3f} |
| caption shape-word accuracy (chance 0.25) | {tw["shape"]:.3f} | {rw["shape"]:.3f} |

## Head Impact ({metrics["held_out"]["hi_images"]} held-out images, all their objects)

| | trained | random init |
|---|---|---|
| best layer (mean HI over heads) | {ht["best_layer"]} ({ht["best_layer_mean_hi"]:.3f}) | {hr["best_layer"]} ({hr["best_layer_mean_hi"]:.3f}) |
| best head HI | {ht["best_head_hi"]:.3f} | {hr["best_head_hi"]:.3f} |
| mean HI over all heads | {ht["mean_hi"]:.3f} | {hr["mean_hi"]:.3f} |
| top-4 layers | {ht["top4_layers"]} | {hr["top4_layers"]} |

{limitations}## How it got here

Earlier versions of this model, kept in git for comparison: trained on the language loss
alone (commit f7aa657), it never learnt shapes and answered VQA at chance; with the
vision phase but on the world's own questions (commit c65e1c2), it reached 0.70 VQA
accuracy by colour alone: on this card's questions, 0.41 on the 100 with a same-colour
lure and 1.00 on the other 100 (`mechhi toy card --model` on that commit's weights). The
lures and the option probe above are the two changes since, with smaller steps (20 scenes
instead of 32) so that the same 700 steps fit the budget with room.

Numbers written by `mechhi toy card` (also in `metrics.json`).
"""
    path = Path(out_dir) / "README.md"
    path.write_text(text)
    return path
