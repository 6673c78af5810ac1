"""What the toy model is taught, step by step: captions and four-option questions on
freshly drawn scenes (lures ramped in), with the labels of the two training probes
(each object's shape and colour; each option's presence). Every batch is a pure
function of (seed, step), so a resumed run sees exactly what it would have."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mechhi.data.format import ImageRecord
from mechhi.data.synthetic import COLOURS, SHAPES, WorldConfig, all_descriptions, describe, render_one
from mechhi.data.vqa import LETTERS, VQAItem, format_options
from mechhi.models import PreparedBatch, VLMAdapter
from mechhi.models.toy import TRAIN_SEED_OFFSET, VISION_SEED_OFFSET, ToyConfig


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
    return VQAItem(
        image=image, options=tuple(options[i] for i in order), answer=int(np.flatnonzero(order == 0)[0])
    )


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
        return ce(self.shape(pooled).float(), batch.object_shape) + ce(
            self.colour(pooled).float(), batch.object_colour
        )


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
    return _captions(
        adapter, [render_one(first + k, seed=seed, config=world) for k in range(config.vision_batch_size)]
    )


def training_batches(adapter: VLMAdapter, config: ToyConfig, step: int) -> dict[str, TrainBatch]:
    """The batches of one language-phase step, a pure function of (seed, step) so that
    resume is exact: ``vqa_per_step`` VQA questions and the rest captioned, except in the
    first ``caption_only_steps``, where all are captioned."""
    rng = np.random.default_rng([config.seed, step])
    world = WorldConfig(image_size=config.image_size)
    first = step * config.batch_size  # scene indices are disjoint across steps: no image is seen twice
    drawn = [
        render_one(first + k, seed=config.seed + TRAIN_SEED_OFFSET, config=world)
        for k in range(config.batch_size)
    ]
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
    labelled.option_present = torch.tensor(
        [float(k == q.answer) for q in questions for k in range(len(LETTERS))]
    )
    return {"caption": _captions(adapter, drawn[:n_caption]), "vqa": labelled}


def lure_share_at(step: int, config: ToyConfig) -> float:
    """The lure share at a language step: 0 before the ramp, ``lure_share`` after it, linear between."""
    start, end = config.lure_ramp
    return config.lure_share * min(1.0, max(0.0, (step - start) / max(1, end - start)))
