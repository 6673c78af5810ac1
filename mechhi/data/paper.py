"""Convert the paper's published key-object dataset (Sergeev and Kotelnikov, 2025).

The published data (``dataset_masks.json`` + ``masks/*.npz``) pairs 1,000 COCO val2017
images with the noun phrases Florence-2 grounded in one caption; each phrase box has a
SAM2 mask stored as a scipy.sparse matrix at the original image size, shape (H, W).
The images are not included: they are COCO files named by ``image_file_name``.

The source is treated as real-world input: every entry and every box is checked, and
whatever cannot be used is dropped with a reason (`PaperReport`). What the published
file (commit cc17af2) actually contains, checked 2026-11:

- 1,000 entries, 3,284 grounded boxes, 3,280 mask files, all referenced, none missing;
- 2 entries with no phrase at all (the caption is "I am unable to see an image above.");
- 1 entry (image 146363) with 4 labels and boxes but no scores or mask files;
- 485 boxes with a SAM2 score below 0.85 (the paper drops those);
- 334 entries repeat a phrase, 856 repeated boxes in all (up to 20 boxes of one phrase).

Repeated phrases are Florence-2 giving one box per instance of a plural or shared
phrase ("sheep", "cement posts", "Two large identical teddy bears"). The phrase is the
description that is traced, and it refers to all those boxes together, so the default
(``duplicates="merge"``) unions their masks into one object: keeping one box would
label the other instances as background and punish heads that attend to them. The
paper itself kept each box as its own sample (``"separate"``, which reproduces its
roughly 3,000 samples); ``"first"`` and ``"drop"`` are there for comparison.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import scipy.sparse
from PIL import Image

from mechhi.data.format import DatasetError, DatasetWriter, ImageRecord, KeyObject, image_size
from mechhi.progress import tracked

Duplicates = Literal["merge", "first", "separate", "drop"]
DUPLICATE_POLICIES = ("merge", "first", "separate", "drop")
_GROUNDING_KEYS = ("bboxes", "labels", "masks_scores", "masks_file_name")


class Dropped(NamedTuple):
    """One thing left out: ``label`` is None when the whole image was dropped."""

    image_id: str
    label: str | None
    reason: str
    detail: str = ""


@dataclass
class BuildReport:
    """What a dataset builder wrote and what it left out, and why.

    ``dropped`` counts key objects (source boxes / annotations) per reason and
    ``dropped_images`` counts images not written per reason; ``details`` has one line per
    dropped object (and one with ``label=None`` per dropped image), so every number can
    be traced back to the source. ``resumed_images`` were already in the output
    directory (an interrupted build picked up again) and are not counted as kept.
    """

    source: str
    out_dir: str
    kept_images: int = 0
    kept_objects: int = 0
    resumed_images: int = 0
    dropped: Counter = field(default_factory=Counter)
    dropped_images: Counter = field(default_factory=Counter)
    details: list[Dropped] = field(default_factory=list)

    def drop(self, image_id: str, label: str | None, reason: str, detail: str = "") -> None:
        """Record one dropped object (``label`` given) or one dropped image (None)."""
        (self.dropped if label is not None else self.dropped_images)[reason] += 1
        self.details.append(Dropped(image_id, label, reason, detail))

    def _lines(self) -> list[str]:
        lines = [
            f"{self.source} -> {self.out_dir}: kept {self.kept_images} images, "
            f"{self.kept_objects} objects"
            + (f" ({self.resumed_images} images already written, skipped)" if self.resumed_images else "")
        ]
        for title, counter in (("dropped objects", self.dropped), ("dropped images", self.dropped_images)):
            lines.append(f"{title}: {sum(counter.values())}")
            lines += [f"  {reason:<28} {n:>6}" for reason, n in counter.most_common()]
        return lines

    def __str__(self) -> str:
        return "\n".join(self._lines())


@dataclass
class PaperReport(BuildReport):
    """`BuildReport` plus what is specific to the paper's format.

    ``merged_boxes`` counts boxes that were folded into an earlier box of the same
    phrase (``duplicates="merge"``); ``extra_mask_files`` are npz files no entry names.
    """

    min_mask_score: float = 0.85
    duplicates: str = "merge"
    merged_boxes: int = 0
    extra_mask_files: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = self._lines()
        lines.insert(1, f"mask score threshold {self.min_mask_score}, duplicate phrases: {self.duplicates}")
        if self.merged_boxes:
            lines.append(f"boxes merged into an earlier box of the same phrase: {self.merged_boxes}")
        if self.extra_mask_files:
            lines.append(f"mask files no entry names: {len(self.extra_mask_files)}")
        return "\n".join(lines)


class _Box(NamedTuple):
    """One grounded box that passed every check."""

    index: int
    label: str
    bbox: list[float]
    score: float
    file: str
    mask: np.ndarray  # bool (H, W)


def build_from_paper(
    source_dir: str | os.PathLike,
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    min_mask_score: float = 0.85,
    duplicates: Duplicates = "merge",
    overwrite: bool = False,
    progress: bool = True,
) -> PaperReport:
    """Write the paper's dataset in mechhi's format: one key object per grounded phrase.

    ``source_dir`` holds ``dataset_masks.json`` and ``masks/``; ``images_dir`` the COCO
    val2017 images (entries whose image is absent are dropped as "missing image").
    Description = the phrase, caption = the caption it was grounded in. Re-running on an
    existing ``out_dir`` resumes unless ``overwrite``.

    >>> report = build_from_paper("sergeev2025", "coco/val2017", "data/paper")  # doctest: +SKIP
    >>> print(report)                                                                      # doctest: +SKIP
    """
    source_dir, images_dir = Path(source_dir), Path(images_dir)
    if duplicates not in DUPLICATE_POLICIES:
        raise ValueError(f"duplicates must be one of {', '.join(DUPLICATE_POLICIES)}, got {duplicates!r}")
    if not 0.0 <= min_mask_score <= 1.0:
        raise ValueError(f"min_mask_score must be in [0, 1], got {min_mask_score}")
    entries = _read_entries(source_dir / "dataset_masks.json")
    if not images_dir.is_dir():
        raise DatasetError(f"images directory {images_dir} does not exist")
    report = PaperReport(str(source_dir), str(out_dir), min_mask_score=min_mask_score, duplicates=duplicates)
    masks_dir = source_dir / "masks"
    report.extra_mask_files = _extra_mask_files(masks_dir, entries)
    seen: set[str] = set()
    with DatasetWriter(out_dir, overwrite=overwrite) as writer:
        for n, entry in enumerate(tracked(entries, "paper dataset", show=progress)):
            converted = _convert_entry(n, entry, images_dir, masks_dir, seen, writer.done_ids, report)
            if converted is not None:
                record, image_path = converted
                writer.add(record, image_path)
                report.kept_images += 1
                report.kept_objects += len(record.objects)
    return report


def _read_entries(path: Path) -> list[Any]:
    if not path.is_file():
        raise DatasetError(f"paper dataset file {path} does not exist")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(entries, list):
        raise DatasetError(f"{path} must hold a JSON list of entries, got {type(entries).__name__}")
    return entries


def _extra_mask_files(masks_dir: Path, entries: list[Any]) -> list[str]:
    """npz files in ``masks_dir`` that no entry names (reported, not an error)."""
    if not masks_dir.is_dir():
        raise DatasetError(f"masks directory {masks_dir} does not exist")
    named = {
        f
        for e in entries
        if isinstance(e, dict) and isinstance(e.get("grounding"), dict)
        for f in _flat(e["grounding"].get("masks_file_name") or [])
    }
    return sorted(p.name for p in masks_dir.glob("*.npz") if p.name not in named)


def _flat(items: Iterable[Any]) -> Iterator[Any]:
    for item in items:
        yield from (item if isinstance(item, list) else [item])


def _convert_entry(
    n: int,
    entry: Any,
    images_dir: Path,
    masks_dir: Path,
    seen: set[str],
    done: set[str],
    report: PaperReport,
) -> tuple[ImageRecord, Path] | None:
    """The record for one entry, or None (with the reasons in ``report``)."""
    problem = _entry_problem(entry)
    if problem is not None:
        image_id = _image_id(entry.get("image_id")) if isinstance(entry, dict) else None
        report.drop(image_id or f"entry {n}", None, "malformed entry", problem)
        return None
    image_id, g = _image_id(entry["image_id"]), entry["grounding"]
    labels = g["labels"]
    if image_id in seen:
        return _drop_all(report, image_id, labels, "duplicate image entry", f"entry {n}")
    seen.add(image_id)
    if image_id in done:
        report.resumed_images += 1
        return None
    if not labels:
        report.drop(image_id, None, "no grounded phrases", entry.get("annotation_full_text") or "")
        return None
    lengths = {k: len(g[k]) for k in _GROUNDING_KEYS}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{k}={v}" for k, v in lengths.items())
        return _drop_all(report, image_id, labels, "length mismatch", detail)
    image_path = images_dir / entry["image_file_name"]
    size = _image_size(image_path)
    if isinstance(size, str):
        return _drop_all(report, image_id, labels, size, str(image_path))
    width, height = size

    boxes = []
    for i, box in enumerate(zip(*(g[k] for k in _GROUNDING_KEYS))):
        checked = _check_box(i, *box, masks_dir, (height, width), report.min_mask_score)
        if isinstance(checked, _Box):
            boxes.append(checked)
        else:
            label = box[1] if isinstance(box[1], str) else repr(box[1])
            report.drop(image_id, label, *checked)
    objects = _objects(boxes, report.duplicates, image_id, report)
    if not objects:
        report.drop(image_id, None, "no objects left")
        return None
    caption = entry.get("annotation_full_text")
    record = ImageRecord(
        image_id=image_id,
        file="",  # set by DatasetWriter
        width=width,
        height=height,
        caption=caption.strip() if isinstance(caption, str) else None,
        objects=tuple(objects),
    )
    return record, image_path


def _drop_all(report: PaperReport, image_id: str, labels: list[Any], reason: str, detail: str) -> None:
    """Drop a whole image: one line per label it had, plus one for the image."""
    for label in labels:
        report.drop(image_id, label if isinstance(label, str) else repr(label), reason, detail)
    report.drop(image_id, None, reason, detail)
    return None


def _entry_problem(entry: Any) -> str | None:
    """Why an entry's structure is unusable, or None."""
    if not isinstance(entry, dict):
        return f"expected a JSON object, got {type(entry).__name__}"
    missing = [k for k in ("image_id", "image_file_name", "grounding") if k not in entry]
    if missing:
        return f"missing key(s) {', '.join(missing)}"
    if _image_id(entry["image_id"]) is None:
        return f"image_id must be a non-negative int or a file-name-safe string, got {entry['image_id']!r}"
    name = entry["image_file_name"]
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        return f"image_file_name must be a bare file name, got {name!r}"
    g = entry["grounding"]
    if not isinstance(g, dict):
        return f"grounding must be an object, got {type(g).__name__}"
    bad = [k for k in _GROUNDING_KEYS if not isinstance(g.get(k), list)]
    if bad:
        return f"grounding key(s) {', '.join(bad)} missing or not lists"
    return None


def _image_id(raw: Any) -> str | None:
    """COCO ids are ints; written zero-padded to 12 digits like COCO's file names."""
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        return f"{raw:012d}"
    if isinstance(raw, str) and raw and all(c.isalnum() or c in "._-" for c in raw) and raw[0].isalnum():
        return raw
    return None


def _image_size(path: Path) -> tuple[int, int] | str:
    """(width, height) from the image header, or the drop reason."""
    if not path.is_file():
        return "missing image"
    try:
        return image_size(path)  # EXIF orientation applied, as the dataset format uses images
    except (OSError, Image.DecompressionBombError):
        return "unreadable image"


def _check_box(
    index: int,
    bbox: Any,
    label: Any,
    scores: Any,
    files: Any,
    masks_dir: Path,
    shape: tuple[int, int],
    min_score: float,
) -> _Box | tuple[str, str]:
    """A box that passed every check, or (reason, detail). Cheap checks run first so
    masks are only loaded for boxes that can be kept."""
    if not isinstance(label, str) or not label.strip():
        return "empty label", repr(label)
    scores, files = _as_list(scores), _as_list(files)
    if len(scores) != len(files) or not scores:
        return "length mismatch", f"{len(scores)} scores, {len(files)} mask files"
    if not all(_is_number(s) for s in scores) or not all(isinstance(f, str) for f in files):
        return "bad mask score", f"scores {scores!r}, files {files!r}"
    best = int(np.argmax(scores))  # SAM2 multimask output: use the best-scoring candidate
    score, file = float(scores[best]), files[best]
    if score < min_score:
        return "low mask score", f"{score:.4f} < {min_score}"
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return "bad box", repr(bbox)
    path = masks_dir / file
    if Path(file).name != file or not path.is_file():
        return "missing mask file", file
    try:
        mask = scipy.sparse.load_npz(path).toarray() > 0  # (H, W) bool
    except (OSError, ValueError, KeyError) as e:
        return "unreadable mask file", f"{file}: {' '.join(str(e).split())}"
    if mask.shape != shape:
        got = f"{mask.shape[0]}x{mask.shape[1]}"
        return "mask shape mismatch", f"{file} is {got}, image {shape[0]}x{shape[1]} (HxW)"
    if not mask.any():
        return "empty mask", file
    return _Box(index, label.strip(), [float(v) for v in bbox], score, file, mask)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _objects(boxes: list[_Box], policy: str, image_id: str, report: PaperReport) -> list[KeyObject]:
    """Key objects from the checked boxes, grouping boxes of the same phrase by ``policy``.

    The object id is the index of the group's first box in the entry, so it maps back to
    the source file names (``e<entry>o<index>m0.npz``).
    """
    if policy == "separate":
        return [_key_object([b]) for b in boxes]
    groups: dict[str, list[_Box]] = {}
    for b in boxes:
        groups.setdefault(b.label, []).append(b)
    objects = []
    for label, group in groups.items():
        if len(group) > 1 and policy == "drop":
            for _ in group:
                report.drop(image_id, label, "duplicate phrase", f"{len(group)} boxes")
            continue
        if len(group) > 1 and policy == "first":
            for b in group[1:]:
                report.drop(image_id, label, "duplicate phrase", f"box {b.index} after box {group[0].index}")
            group = group[:1]
        report.merged_boxes += len(group) - 1
        objects.append(_key_object(group))
    return objects


def _key_object(group: list[_Box]) -> KeyObject:
    """One object from one or more boxes of the same phrase (mask = their union)."""
    mask = np.logical_or.reduce([b.mask for b in group])  # (H, W)
    attributes = {
        "source": "sergeev2025",
        "bboxes": [b.bbox for b in group],
        "mask_scores": [b.score for b in group],
        "mask_files": [b.file for b in group],
    }
    return KeyObject.from_mask(str(group[0].index), group[0].label, mask, attributes)
