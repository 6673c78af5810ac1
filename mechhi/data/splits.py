"""The paper's splits: a tracing part and a fine-tuning part (1:2), the fine-tuning part
cut into train / val / test in the ratio 1200 : 300 : 500.

Splits are drawn by *image*, never by object: two objects of one image share every
pixel of the input, so an image in both the training and the test split would leak.
The paper counts its split sizes in samples (objects), so by default the images are
shuffled and then cut where the running object count crosses each boundary; every
split then holds its share of objects to within one image's objects. The shuffle is a
seeded permutation of the *sorted* ids, so the result does not depend on the order the
ids come in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from mechhi.data.format import ANNOTATIONS, SPLITS, DatasetError, KeyObjectDataset, load_dataset

PAPER_FINETUNE_RATIOS = (1200, 300, 500)  # train, val, test (Section 3 of the paper)


def split_fractions(trace_fraction: float, finetune_ratios: Sequence[float]) -> dict[str, float]:
    """Fraction of the whole for each split: ``{"trace": 1/3, "train": 0.4, ...}``."""
    if not 0.0 <= trace_fraction <= 1.0:
        raise ValueError(f"trace_fraction must be in [0, 1], got {trace_fraction}")
    ratios = [float(r) for r in finetune_ratios]
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise ValueError(
            f"finetune_ratios must be three non-negative numbers (train, val, test) with a "
            f"positive sum, got {tuple(finetune_ratios)}"
        )
    rest = (1.0 - trace_fraction) / sum(ratios)
    return dict(zip(SPLITS, [trace_fraction] + [r * rest for r in ratios]))


def assign_splits(
    image_ids: Sequence[str] | Mapping[str, int],
    *,
    seed: int = 0,
    trace_fraction: float = 1 / 3,
    finetune_ratios: Sequence[float] = PAPER_FINETUNE_RATIOS,
) -> dict[str, str]:
    """image id -> split name ("trace", "train", "val", "test").

    Given a mapping (image id -> number of objects) the fractions apply to objects,
    given a plain sequence to images. Each image goes to the split in which the
    midpoint of its stretch of the running count falls, so split sizes are the exact
    shares rounded to whole images.

    >>> from collections import Counter
    >>> s = assign_splits([f"{i:03d}" for i in range(30)], seed=0)
    >>> sorted(Counter(s.values()).items())
    [('test', 5), ('trace', 10), ('train', 12), ('val', 3)]
    """
    fractions = split_fractions(trace_fraction, finetune_ratios)
    if isinstance(image_ids, Mapping):
        weights = dict(image_ids)
    else:
        ids = list(image_ids)
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"image id {dup!r} is listed more than once")
        weights = dict.fromkeys(ids, 1)
    bad = [k for k, w in weights.items() if not isinstance(w, int | np.integer) or w < 0]
    if bad:
        k = bad[0]
        raise ValueError(f"image {k!r}: object count must be a non-negative int, got {weights[k]!r}")
    ordered = sorted(weights, key=str)
    ordered = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    w = np.array([weights[k] for k in ordered], dtype=float)  # (n_images,)
    if len(w) and w.sum() == 0:
        raise ValueError("every image has 0 objects: nothing to split by")
    ends = np.cumsum(list(fractions.values())) * w.sum()  # (4,) upper boundary of each split
    midpoints = np.cumsum(w) - w / 2  # (n_images,)
    which = np.minimum(np.searchsorted(ends, midpoints, side="right"), len(SPLITS) - 1)
    return {k: SPLITS[i] for k, i in zip(ordered, which)}


@dataclass
class SplitReport:
    """Images and objects per split after `write_splits`."""

    path: str
    seed: int
    weight_by: str
    images: dict[str, int] = field(default_factory=dict)
    objects: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        total_o = sum(self.objects.values()) or 1
        lines = [f"splits of {self.path} (seed {self.seed}, by {self.weight_by}):"]
        lines += [
            f"  {s:<6} {self.images.get(s, 0):>6} images {self.objects.get(s, 0):>7} objects"
            f" ({100 * self.objects.get(s, 0) / total_o:5.1f}%)"
            for s in SPLITS
        ]
        return "\n".join(lines)


def write_splits(
    dataset_dir: str | os.PathLike,
    *,
    seed: int = 0,
    trace_fraction: float = 1 / 3,
    finetune_ratios: Sequence[float] = PAPER_FINETUNE_RATIOS,
    weight_by: Literal["objects", "images"] = "objects",
) -> SplitReport:
    """Set the ``split`` field of every record of a dataset, replacing any earlier one.

    The file is rewritten through a temporary file and `os.replace`, so a crash leaves
    either the old or the new annotations, never half of each. Everything else in each
    line is kept as it was.
    """
    if weight_by not in ("objects", "images"):
        raise ValueError(f"weight_by must be 'objects' or 'images', got {weight_by!r}")
    path = Path(dataset_dir) / ANNOTATIONS
    if not path.is_file():
        raise DatasetError(f"dataset directory {dataset_dir} has no {ANNOTATIONS}")
    records = _read_records(path)
    counts = {r["image_id"]: len(r["objects"]) for r in records}
    keys = counts if weight_by == "objects" else list(counts)
    split_of = assign_splits(keys, seed=seed, trace_fraction=trace_fraction, finetune_ratios=finetune_ratios)

    report = SplitReport(
        str(dataset_dir), seed, weight_by, dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    )
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for r in records:
            s = split_of[r["image_id"]]
            fh.write(json.dumps(_with_split(r, s), ensure_ascii=False) + "\n")
            report.images[s] += 1
            report.objects[s] += counts[r["image_id"]]
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return report


def _read_records(path: Path) -> list[dict]:
    """The JSON objects of ``annotations.jsonl``; only what splitting needs is checked
    (`load_dataset` validates the rest)."""
    records, seen = [], set()
    for line_no, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DatasetError(f"{ANNOTATIONS} line {line_no}: not valid JSON ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("image_id"), str):
            raise DatasetError(f"{ANNOTATIONS} line {line_no}: not a record with a string image_id")
        if not isinstance(obj.get("objects"), list):
            where = f"{ANNOTATIONS} line {line_no} (image {obj['image_id']!r})"
            raise DatasetError(f"{where}: objects must be a list")
        if obj["image_id"] in seen:
            raise DatasetError(f"{ANNOTATIONS} line {line_no}: duplicate image_id {obj['image_id']!r}")
        seen.add(obj["image_id"])
        records.append(obj)
    return records


def _with_split(record: dict, split: str) -> dict:
    """``record`` with ``split`` set, placed before ``objects`` as `record_to_json` does."""
    out = {}
    for k, v in record.items():
        if k == "split":
            continue
        if k == "objects":
            out["split"] = split
        out[k] = v
    return out


# ------------------------------------------------- reading one split (training, evaluation, interventions)
def split_of(data: KeyObjectDataset, split: str, limit: int | None = None) -> KeyObjectDataset:
    """One split of an already read dataset, failing with a clear message when it is empty."""
    part = data.split(split)
    if len(part) == 0:
        raise ValueError(
            f"dataset {data.root} has no samples in split {split!r} (splits: {data.split_counts()})"
        )
    if limit is not None and limit < len(part):
        part.samples = part.samples[:limit]
    return part


def load_split(dataset: str | os.PathLike, split: str, limit: int | None = None) -> KeyObjectDataset:
    """One split of a dataset directory (reads its annotations: use `split_of` for more splits)."""
    return split_of(load_dataset(dataset), split, limit)
