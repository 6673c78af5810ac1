"""Build a key-object dataset from a folder of images: Florence-2 grounding + SAM2 masks.

This is the paper's pipeline (section 3): each image gets a caption (Florence-2's
``<MORE_DETAILED_CAPTION>`` or ``<CAPTION>``, or one the user gives), Florence-2's
``<CAPTION_TO_PHRASE_GROUNDING>`` turns the caption into phrases with boxes, SAM2 turns
each box into a mask, and masks whose SAM2 score is below a threshold (0.85 in the paper)
are dropped. Each kept (phrase, mask) pair becomes one key object; the caption becomes
the record's caption.

It uses transformers' own classes (``Florence2ForConditionalGeneration`` /
``Florence2Processor``, ``Sam2Model`` / ``Sam2Processor``), so the parsing of Florence's
``<loc_*>`` tokens is the processor's ``post_process_generation`` and the upsampling of
SAM2's low-resolution logits is the processor's ``post_process_masks``. Native
transformers Florence-2 weights live under ``florence-community/``; the paper's
``microsoft/Florence-2-large-ft`` is the same network packaged as remote code with other
weight names, which these classes cannot load.

Choices that are not in the paper, made explicit here:

- SAM2 mask per box: ``multimask_output=False`` by default, the usual setting for box
  prompts: SAM2's single-mask output, for which transformers swaps in the best of the
  three multimask outputs when the single mask is unstable. ``multimask_output=True``
  asks for three masks and keeps the highest-scoring one. Either way the kept mask's
  predicted IoU is the ``score`` that is thresholded and recorded.
- A phrase grounded to several boxes (e.g. "two dogs") keeps only its best-scoring mask
  that passed the filters; the others are dropped as ``duplicate_phrase`` (phrases are
  compared case-insensitively), because a description must name one mask in an image.
- An image with no kept object is still written (with no objects) so that a resumed run
  does not redo it; it adds no samples.

Resuming: image ids already in ``out_dir`` (`DatasetWriter.done_ids`) are skipped, and
every record is appended and flushed as soon as its batch is done, so an interrupted run
loses at most one batch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mechhi.data.format import DatasetError, DatasetWriter, ImageProblem, ImageRecord, KeyObject, open_image
from mechhi.devices import resolve_device, resolve_dtype
from mechhi.progress import progress_bar

GROUNDING_TASK = "<CAPTION_TO_PHRASE_GROUNDING>"
CAPTION_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DROP_REASONS = ("no_phrase", "low_score", "empty_mask", "duplicate_phrase")


@dataclass
class GroundingConfig:
    """Options of the grounding pipeline (defaults follow the paper where it says)."""

    florence: str = "florence-community/Florence-2-large-ft"  # HF id or local directory
    sam: str = "facebook/sam2.1-hiera-large"  # HF id or local directory
    caption_task: str = "<MORE_DETAILED_CAPTION>"  # or <CAPTION>, <DETAILED_CAPTION>
    min_score: float = 0.85  # keep masks whose SAM2 score (predicted IoU) is >= this
    batch_size: int = 8  # images per Florence-2 / SAM2 call
    device: str = "auto"  # auto | cpu | cuda[:n]
    dtype: str = "auto"  # auto: bfloat16 Florence-2 on a bf16 GPU, SAM2 float32
    max_new_tokens: int = 256  # per Florence-2 generation (caption, grounding)
    num_beams: int = 3  # Florence-2's own examples decode with 3 beams
    multimask_output: bool = False  # True: best of SAM2's 3 masks per box

    def __post_init__(self) -> None:
        if self.caption_task not in CAPTION_TASKS:
            raise DatasetError(f"caption_task {self.caption_task!r} is not one of {', '.join(CAPTION_TASKS)}")
        if not np.isfinite(self.min_score):
            raise DatasetError(f"min_score must be a finite number, got {self.min_score!r}")
        for name in ("batch_size", "max_new_tokens", "num_beams"):
            if getattr(self, name) < 1:
                raise DatasetError(f"{name} must be at least 1, got {getattr(self, name)!r}")


@dataclass
class GroundingReport:
    """What a build did. ``dropped["no_phrase"]`` counts images (nothing grounded); the
    other reasons count objects."""

    out_dir: Path
    images_found: int = 0  # images considered (after ``limit``)
    images_skipped: int = 0  # already in out_dir (resume)
    images_processed: int = 0
    captions_given: int = 0  # captions taken from the user's mapping
    captions_generated: int = 0  # captions made by Florence-2
    objects_kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``--json`` prints)."""
        out = asdict(self)
        out["out_dir"] = str(self.out_dir)
        return out

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        """One line for the console."""
        drops = ", ".join(f"{k}={v}" for k, v in self.dropped.items())
        return (
            f"{self.images_processed} images processed ({self.images_skipped} already done), "
            f"{self.objects_kept} objects kept; dropped: {drops} -> {self.out_dir}"
        )


# ----------------------------------------------------------------------------- inputs


def list_images(images_dir: str | Path) -> list[Path]:
    """Image files directly in ``images_dir`` (not recursive), sorted by name."""
    root = Path(images_dir)
    if not root.is_dir():
        raise DatasetError(f"images directory {root} does not exist")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"images directory {root} has no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def image_ids(files: Sequence[Path]) -> list[str]:
    """A file-name-safe image id per file: its stem, other characters replaced by ``_``."""
    ids, owner = [], {}
    for path in files:
        image_id = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)
        if not image_id[:1].isalnum():
            image_id = "i" + image_id
        if image_id in owner:
            raise DatasetError(
                f"images {owner[image_id].name} and {path.name} both map to image id {image_id!r}"
            )
        owner[image_id] = path
        ids.append(image_id)
    return ids


def load_captions(path: str | Path) -> dict[str, str]:
    """Captions from a ``.json`` object {file name: caption} or a ``.jsonl`` file of
    {"file": ..., "caption": ...} lines. Keys may be the file name or its stem."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"captions file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            mapping = {row["file"]: row["caption"] for row in rows}
        else:
            mapping = json.loads(text)
    except (ValueError, KeyError, TypeError) as error:
        raise DatasetError(f"captions file {path} is not a file->caption mapping ({error})") from None
    return _check_captions(mapping, str(path))


def _check_captions(mapping: Any, where: str) -> dict[str, str]:
    if not isinstance(mapping, dict):
        kind = type(mapping).__name__
        raise DatasetError(f"captions ({where}) must map file names to captions, got {kind}")
    bad = [k for k, v in mapping.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise DatasetError(f"captions ({where}): entry {bad[0]!r} is not a string -> string pair")
    return dict(mapping)


# ----------------------------------------------------------------------------- models


def _resolve(config: GroundingConfig) -> tuple[torch.device, torch.dtype, torch.dtype]:
    """(device, Florence-2 dtype, SAM2 dtype). ``auto`` keeps SAM2 in float32 because its
    score is compared with a threshold, where bfloat16's 3 significant digits matter."""
    try:
        device = resolve_device(config.device)
        florence_dtype = resolve_dtype(config.dtype, device)
    except ValueError as error:
        raise DatasetError(str(error)) from None
    sam_dtype = torch.float32 if config.dtype == "auto" else florence_dtype
    return device, florence_dtype, sam_dtype


def _from_pretrained(
    kind: str, source: str, model_cls: Any, processor_cls: Any, option: str
) -> tuple[Any, Any]:
    """(model, processor) of ``source``; one clear line when it cannot be loaded (no
    network here: a hub id only works if it is already in the local HF cache)."""
    try:
        processor = processor_cls.from_pretrained(source)
        model = model_cls.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        hint = (
            ""
            if Path(source).is_dir()
            else (
                f"; it is not a local directory and the hub may be unreachable: download it where there "
                f"is network and pass the directory ({option} DIR)"
            )
        )
        raise DatasetError(f"cannot load {kind} from {source!r}{hint} [{reason}]") from None
    return model, processor


def load_florence(config: GroundingConfig) -> tuple[Any, Any]:
    """Florence-2 (model in eval mode on the configured device/dtype, processor)."""
    from transformers import Florence2ForConditionalGeneration, Florence2Processor

    device, dtype, _ = _resolve(config)
    model, processor = _from_pretrained(
        "Florence-2", config.florence, Florence2ForConditionalGeneration, Florence2Processor, "--florence"
    )
    return model.to(device=device, dtype=dtype).eval(), processor


def load_sam(config: GroundingConfig) -> tuple[Any, Any]:
    """SAM2 (model in eval mode on the configured device/dtype, processor)."""
    from transformers import Sam2Model, Sam2Processor

    device, _, dtype = _resolve(config)
    model, processor = _from_pretrained("SAM2", config.sam, Sam2Model, Sam2Processor, "--sam")
    return model.to(device=device, dtype=dtype).eval(), processor


def _placement(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


# ----------------------------------------------------------------------------- Florence-2


@torch.inference_mode()
def florence_run(
    florence: tuple[Any, Any],
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    task: str,
    config: GroundingConfig,
    names: Sequence[str] | None = None,
) -> list[Any]:
    """One batched Florence-2 generation; per image, the processor's parsed answer for
    ``task`` (a str for captions, {"bboxes", "labels"} for grounding, boxes in pixels of
    the original image as (x1, y1, x2, y2)). ``names`` label the images in errors."""
    model, processor = florence
    device, dtype = _placement(model)
    inputs = processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True)
    _check_length(inputs["attention_mask"], model, names or [f"image {k}" for k in range(len(images))])
    generated = model.generate(
        input_ids=inputs["input_ids"].to(device),
        attention_mask=inputs["attention_mask"].to(device),
        pixel_values=inputs["pixel_values"].to(device, dtype),
        max_new_tokens=config.max_new_tokens,
        num_beams=config.num_beams,
        do_sample=False,
    )  # (batch, generated length), right-padded with pad tokens
    # keep <loc_*> (special tokens) for the parser; drop only the batch padding
    pad = processor.tokenizer.pad_token
    texts = processor.batch_decode(generated, skip_special_tokens=False)
    texts = [t.replace(pad, "") if pad else t for t in texts]
    return [
        processor.post_process_generation(text=text, task=task, image_size=im.size)[task]
        for text, im in zip(texts, images)
    ]


def _check_length(attention_mask: torch.Tensor, model: Any, names: Sequence[str]) -> None:
    """Fail clearly on a prompt (image tokens + caption) longer than the text encoder's
    positions: otherwise it is an index error deep inside the embedding."""
    limit = getattr(model.config.text_config, "max_position_embeddings", None)
    lengths = attention_mask.sum(1)  # (batch,)
    if limit is not None and int(lengths.max()) > limit:
        k = int(lengths.argmax())
        raise DatasetError(
            f"{names[k]}: Florence-2 prompt is {int(lengths[k])} tokens (image tokens included), "
            f"more than the model's {limit}; shorten its caption"
        )


# ----------------------------------------------------------------------------- SAM2


@torch.inference_mode()
def sam_masks(
    sam: tuple[Any, Any],
    images: Sequence[Image.Image],
    boxes: Sequence[Sequence[Sequence[float]]],
    *,
    multimask_output: bool = False,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image, (masks bool (n_boxes, H, W), scores (n_boxes,)) for its boxes (pixels of
    the original image, x1 y1 x2 y2), one SAM2 forward for the whole batch.

    SAM2's processor cannot pad box lists of different lengths, so each image's list is
    padded with copies of its last box and the padded outputs are dropped.
    """
    model, processor = sam
    device, dtype = _placement(model)
    out: list[tuple[np.ndarray, np.ndarray]] = [
        (np.zeros((0, im.height, im.width), bool), np.zeros(0, np.float32)) for im in images
    ]
    todo = [i for i, b in enumerate(boxes) if len(b)]
    if not todo:
        return out
    n_max = max(len(boxes[i]) for i in todo)
    padded = [[list(map(float, b)) for b in boxes[i]] for i in todo]
    padded = [b + [b[-1]] * (n_max - len(b)) for b in padded]
    inputs = processor(images=[images[i] for i in todo], input_boxes=padded, return_tensors="pt")
    result = model(
        pixel_values=inputs["pixel_values"].to(device, dtype),
        input_boxes=inputs["input_boxes"].to(device),  # (batch, n_max, 4) in SAM2's input frame
        multimask_output=multimask_output,
    )
    scores = result.iou_scores.float()  # (batch, n_max, k), k = 3 or 1
    best = scores.argmax(-1)  # (batch, n_max)
    h, w = result.pred_masks.shape[-2:]
    index = best[..., None, None, None].expand(-1, -1, 1, h, w)
    logits = result.pred_masks.gather(2, index)  # (batch, n_max, 1, h, w) low-resolution logits
    best_scores = scores.gather(-1, best[..., None])[..., 0].cpu().numpy()  # (batch, n_max)
    sizes = inputs["original_sizes"]  # (batch, 2) as (H, W)
    for row, i in enumerate(todo):
        n = len(boxes[i])  # the padding copies are dropped before upsampling
        # bilinear upsampling to the original size, then logits > 0 (on the model's device)
        (full,) = processor.post_process_masks([logits[row, :n].float()], sizes[row : row + 1])
        # full: (n, 1, H, W) bool
        out[i] = (full[:, 0].cpu().numpy().astype(bool), best_scores[row, :n])
    return out


# ----------------------------------------------------------------------------- selection


def select_objects(
    phrases: Sequence[str],
    boxes: Sequence[Sequence[float]],
    masks: np.ndarray,
    scores: np.ndarray,
    min_score: float,
) -> tuple[list[KeyObject], dict[str, int]]:
    """Key objects to keep, and counts of objects dropped per reason.

    Drops, in this order: score below ``min_score``, empty mask, then among objects with
    the same phrase (case-insensitive) all but the best-scoring one. Kept objects stay in
    grounding order and are numbered "0", "1", ...
    """
    dropped = dict.fromkeys(DROP_REASONS, 0)
    best: dict[str, int] = {}  # normalised phrase -> index of its best candidate
    for j, (phrase, score) in enumerate(zip(phrases, scores)):
        if not score >= min_score:
            dropped["low_score"] += 1
        elif not masks[j].any():
            dropped["empty_mask"] += 1
        else:
            key = " ".join(phrase.lower().split())
            if key in best:
                dropped["duplicate_phrase"] += 1
                if score > scores[best[key]]:
                    best[key] = j
            else:
                best[key] = j
    keep = sorted(best.values())
    objects = [
        KeyObject.from_mask(
            str(n),
            phrases[j].strip(),
            masks[j],
            {"box": [round(float(v), 2) for v in boxes[j]], "score": round(float(scores[j]), 4)},
        )
        for n, j in enumerate(keep)
    ]
    return objects, dropped


# ----------------------------------------------------------------------------- build


def build_from_images(
    images_dir: str | Path,
    out_dir: str | Path,
    *,
    config: GroundingConfig | None = None,
    captions: dict[str, str] | None = None,
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    florence: tuple[Any, Any] | None = None,
    sam: tuple[Any, Any] | None = None,
) -> GroundingReport:
    """Ground every image of ``images_dir`` and write the dataset to ``out_dir``.

    ``captions`` maps file names (or stems) to captions; images it does not cover are
    captioned by Florence-2. ``limit`` takes the first N images in name order (so a
    repeated ``limit`` run does not grow the dataset). ``florence`` / ``sam`` are
    pre-loaded (model, processor) pairs, used where they are (no move, no cast).

    >>> report = build_from_images("photos/", "data/photos")          # doctest: +SKIP
    >>> report.objects_kept, report.dropped                             # doctest: +SKIP
    (412, {'no_phrase': 3, 'low_score': 97, 'empty_mask': 0, 'duplicate_phrase': 21})
    """
    config = config or GroundingConfig()
    captions = _check_captions(captions, "argument") if captions is not None else {}
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be at least 1, got {limit!r}")
    files = list_images(images_dir)[:limit]
    ids = image_ids(files)
    report = GroundingReport(out_dir=Path(out_dir), images_found=len(files))
    with DatasetWriter(out_dir, overwrite=overwrite) as writer:
        todo = [(i, f) for i, f in zip(ids, files) if i not in writer.done_ids]
        report.images_skipped = len(files) - len(todo)
        if not todo:
            return report
        florence = florence or load_florence(config)
        sam = sam or load_sam(config)
        with progress_bar("grounding", len(todo), show=progress) as bar:
            for start in range(0, len(todo), config.batch_size):
                batch = todo[start : start + config.batch_size]
                _build_batch(batch, writer, report, config, captions, florence, sam)
                bar.advance(len(batch), info=f"{report.objects_kept} objects")
    return report


def _build_batch(
    batch: Sequence[tuple[str, Path]],
    writer: DatasetWriter,
    report: GroundingReport,
    config: GroundingConfig,
    captions: dict[str, str],
    florence: tuple[Any, Any],
    sam: tuple[Any, Any],
) -> None:
    """Caption, ground, segment and write one batch of images."""
    images = [_open_rgb(path) for _, path in batch]
    texts: list[str | None] = [captions.get(path.name, captions.get(path.stem)) for _, path in batch]
    names = [path.name for _, path in batch]
    missing = [k for k, t in enumerate(texts) if t is None]
    report.captions_given += len(batch) - len(missing)
    report.captions_generated += len(missing)
    if missing:
        made = florence_run(
            florence,
            [images[k] for k in missing],
            [config.caption_task] * len(missing),
            config.caption_task,
            config,
            [names[k] for k in missing],
        )
        for k, caption in zip(missing, made):
            texts[k] = caption.strip()
    prompts = [GROUNDING_TASK + t for t in texts]
    grounded = florence_run(florence, images, prompts, GROUNDING_TASK, config, names)
    boxes = [g["bboxes"] for g in grounded]
    segmented = sam_masks(sam, images, boxes, multimask_output=config.multimask_output)
    for (image_id, path), image, caption, g, (masks, scores) in zip(
        batch, images, texts, grounded, segmented
    ):
        if not g["labels"]:
            report.dropped["no_phrase"] += 1
        objects, dropped = select_objects(g["labels"], g["bboxes"], masks, scores, config.min_score)
        for reason, n in dropped.items():
            report.dropped[reason] += n
        record = ImageRecord(image_id, "", image.width, image.height, caption, tuple(objects))
        writer.add(record, path)
        report.images_processed += 1
        report.objects_kept += len(objects)


def _open_rgb(path: Path) -> Image.Image:
    try:
        return open_image(path)
    except ImageProblem as problem:
        raise DatasetError(f"image {path} {problem}") from None
