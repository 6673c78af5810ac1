"""The key-object dataset format: one directory, one JSON line per image.

Every dataset source (the synthetic world, COCO, the paper's published format, the
grounding pipeline) writes this format through `DatasetWriter`, and every consumer
(tracing, fine-tuning, evaluation) reads it through `load_dataset`. Keeping one format
means validation lives in one place, and a bad record is reported once, with its line
number, instead of surfacing later as a silent wrong IoU.

Layout::

    <root>/images/<image_id>.png
    <root>/annotations.jsonl       one JSON object per line:

    {"image_id": "000001", "file": "images/000001.png", "width": 224, "height": 224,
     "caption": "a red circle and a blue square", "split": "train",
     "objects": [{"object_id": "0", "description": "a red circle",
                  "mask": {"size": [224, 224], "counts": "<COCO compressed RLE>"},
                  "attributes": {"shape": "circle", "colour": "red", "size": "large"}}],
     "questions": [{"question": "What is shown in this photo?",
                    "options": ["a red circle", "...", "...", "..."], "answer": 0,
                    "object_id": "0"}]}

``split``, ``caption``, ``attributes`` and ``questions`` are optional. Masks are COCO
compressed RLE (column-major, ``size`` is ``[height, width]``), the same encoding that
pycocotools and most segmentation tools produce.

Images are used as displayed: decoded in full, turned upright by their EXIF orientation
tag (``ImageOps.exif_transpose``, as COCO tools do), 16-bit pixels scaled to 8 bits.
``width``, ``height`` and every mask are in that upright orientation; `check_dataset`
notes each image that carries an orientation tag. `open_image` is the one place that
reads an image, for validation, tracing, training and figures alike.

The unit that is traced is a `Sample`: one (image, key object) pair. Sizes in messages
are written height x width (``HxW``), the order of ``mask.size`` and of numpy arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageOps
from pycocotools import mask as coco_mask

ANNOTATIONS = "annotations.jsonl"
IMAGES = "images"
SPLITS = ("trace", "train", "val", "test")
RECORD_KEYS = ("image_id", "file", "width", "height", "objects")
OBJECT_KEYS = ("object_id", "description", "mask")
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # usable as a file name as-is


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; the one-line message names the record.

    ``problem`` carries the structured form (line, image, object, reason) when the error
    comes from one record of ``annotations.jsonl``.
    """

    def __init__(self, message: str, problem: Skipped | None = None) -> None:
        super().__init__(message)
        self.problem = problem


# ----------------------------------------------------------------------------- masks


def encode_mask(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a 2-D mask, with ``counts`` as str so it fits in JSON.

    >>> encode_mask(np.ones((2, 3), bool))
    {'size': [2, 3], 'counts': '06'}
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D (height, width), got shape {mask.shape}")
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))  # pycocotools wants (H, W) F-order
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_counts(counts: str | bytes) -> list[int]:
    """The run lengths encoded in a COCO compressed RLE string (pycocotools' rleFrString).

    Done in Python because pycocotools decodes a string whose runs fall short of the mask
    size without complaint, filling the rest with uninitialised memory: validation must
    check the runs before anything is decoded.
    """
    data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    runs: list[int] = []
    p = 0
    while p < len(data):
        x = k = 0
        more = True
        while more:
            if p >= len(data):
                raise ValueError("RLE counts string ends in the middle of a number")
            c = data[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"RLE counts string has an invalid character {chr(data[p])!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)  # sign extension of a negative delta
        if len(runs) > 2:
            x += runs[-2]  # runs after the third are stored as deltas
        runs.append(x)
    return runs


def _check_rle(rle: Any) -> tuple[int, int]:
    """(height, width) of a well-formed RLE dict; ValueError with the reason otherwise."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("mask must be an RLE object with 'size' and 'counts'")
    size = rle["size"]
    if (
        not isinstance(size, list | tuple)
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in size)
    ):
        raise ValueError(f"mask size must be [height, width] of non-negative ints, got {size!r}")
    h, w = size
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE, as in COCO's iscrowd annotations
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError("uncompressed RLE counts must be non-negative ints")
        runs = counts
    elif isinstance(counts, str | bytes):
        runs = rle_counts(counts)
    else:
        raise ValueError(f"mask counts must be a string or a list, got {type(counts).__name__}")
    if any(r < 0 for r in runs):
        raise ValueError("mask RLE has a negative run length")
    if sum(runs) != h * w:
        raise ValueError(f"mask RLE runs cover {sum(runs)} pixels but size {h}x{w} has {h * w}")
    return h, w


def decode_mask(rle: dict) -> np.ndarray:
    """bool (height, width) mask from COCO RLE (compressed str/bytes or uncompressed list)."""
    h, w = _check_rle(rle)
    counts = rle["counts"]
    if isinstance(counts, list):
        coded = coco_mask.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    else:
        coded = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    with warnings.catch_warnings():  # pycocotools' numpy-2 copy=False deprecation, harmless
        warnings.simplefilter("ignore", DeprecationWarning)
        return coco_mask.decode(coded).astype(bool)  # (H, W)


# ----------------------------------------------------------------------------- images

ORIENTATION = 0x0112  # the EXIF tag; values 5-8 turn the image by 90 degrees
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # one channel of 16 (or 32) bits


class ImageProblem(ValueError):
    """An image file that cannot be used; the message says why."""


class ImageUse(Protocol):
    """How a model uses images (a `VLMAdapter` is one): which sizes its processor refuses,
    and by how much an image may be decoded reduced without changing what it makes of it."""

    def image_size_problem(self, image_size: tuple[int, int]) -> str | None: ...

    def shrink_factor(self, image_size: tuple[int, int], factors: Sequence[int]) -> int: ...


ORIGINAL_SIZE = "mechhi.original_size"  # Image.info key: upright (width, height) of an image decoded reduced
JPEG_DRAFT_FACTORS = (2, 4, 8)  # what libjpeg decodes at directly (`Image.draft`)
REDUCE_FACTORS = (2, 4, 8, 16, 32, 64)  # `Image.reduce` after a full decode, for other formats
REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK")  # averaged per channel by `Image.reduce`
LARGE_IMAGE = "large image"  # how a note on an image over Pillow's decompression-bomb limit starts


def open_image(path: str | os.PathLike, *, use: ImageUse | None = None) -> Image.Image:
    """The image as every consumer uses it: decoded in full (a truncated file fails here,
    not inside the model), upright by its EXIF orientation, 8-bit RGB.

    A 16-bit single-channel image (e.g. a 16-bit grey PNG, mode ``I;16``) is scaled to
    8 bits (v / 257); Pillow's own conversion would clip it to white. Floating-point
    pixels are refused: their range is unknown.

    ``use``: the model the image is for. An image much larger than its processor resizes
    to is then decoded reduced (JPEG by libjpeg's scaled decode, others by averaging
    blocks after the decode) by the largest factor `ImageUse.shrink_factor` allows; its
    full size is kept in ``info[ORIGINAL_SIZE]`` (`displayed_size`), where masks and token
    boxes stay. Pillow's decompression-bomb warning is not printed: `check_dataset` notes
    such an image in one line naming its record.
    """
    try:
        with _quiet_bombs(), Image.open(path) as im:
            full = _upright_size(im)
            jpeg = im.format == "JPEG"
            factor = use.shrink_factor(full, JPEG_DRAFT_FACTORS if jpeg else REDUCE_FACTORS) if use else 1
            if factor > 1 and jpeg:
                im.draft(im.mode, (-(-im.width // factor), -(-im.height // factor)))
            im.load()
            if factor > 1 and not jpeg:
                small = im.reduce(factor) if im.mode in REDUCIBLE_MODES else _rgb8(im).reduce(factor)
                small.info = dict(im.info)  # the EXIF orientation, applied below
                im = small
            upright = _rgb8(ImageOps.exif_transpose(im))
    except (OSError, Image.DecompressionBombError) as error:
        raise ImageProblem(f"cannot be decoded ({_one_line(error)})") from None
    if upright.size != full:
        upright.info[ORIGINAL_SIZE] = full
    return upright


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """The (width, height) the image has as displayed: its full size where `open_image`
    decoded it reduced (the size its record, masks and token boxes are in)."""
    return tuple(image.info.get(ORIGINAL_SIZE, image.size))  # type: ignore[return-value]


@contextmanager
def _quiet_bombs() -> Iterator[None]:
    """Pillow's DecompressionBombWarning silenced: a large image is reported once, by
    `check_dataset`, in one line naming its record."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), from the header only."""
    with _quiet_bombs(), Image.open(path) as im:
        return _upright_size(im)


def orientation(im: Image.Image) -> int:
    """The EXIF orientation of an opened image (1 = upright, also when there is no tag)."""
    return int(im.getexif().get(ORIENTATION, 1) or 1)


def _upright_size(im: Image.Image) -> tuple[int, int]:
    width, height = im.size
    return (height, width) if orientation(im) in (5, 6, 7, 8) else (width, height)


def _rgb8(im: Image.Image) -> Image.Image:
    if im.mode == "F":
        raise ImageProblem("has floating-point pixels (mode F); save it as an 8- or 16-bit image")
    if im.mode in HIGH_BIT_MODES:
        values = np.asarray(im)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageProblem(f"has {im.mode} pixels outside 0..65535; save it as an 8- or 16-bit image")
        im = Image.fromarray(np.rint(values.astype(np.float64) / 257.0).astype(np.uint8))
    return im.convert("RGB")


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class KeyObject:
    """One key object of an image: its description and its exact mask (as RLE)."""

    object_id: str
    description: str
    mask_rle: dict
    attributes: dict = field(default_factory=dict)

    def mask(self) -> np.ndarray:
        """bool (height, width) mask at the original image size."""
        return decode_mask(self.mask_rle)

    @classmethod
    def from_mask(
        cls, object_id: str, description: str, mask: np.ndarray, attributes: dict | None = None
    ) -> KeyObject:
        """Build from a dense mask, e.g. ``KeyObject.from_mask("0", "a red circle", m)``."""
        return cls(str(object_id), description, encode_mask(mask), dict(attributes or {}))


@dataclass(frozen=True)
class ImageRecord:
    """One line of ``annotations.jsonl``; ``file`` is relative to the dataset root."""

    image_id: str
    file: str
    width: int
    height: int
    caption: str | None
    objects: tuple[KeyObject, ...]
    questions: tuple[dict, ...] = ()
    split: str | None = None


def record_to_json(record: ImageRecord) -> dict:
    """The JSON object written for ``record`` (key order fixed, so lines are reproducible)."""
    out: dict[str, Any] = {
        "image_id": record.image_id,
        "file": record.file,
        "width": record.width,
        "height": record.height,
        "caption": record.caption,
    }
    if record.split is not None:
        out["split"] = record.split
    out["objects"] = [
        {
            "object_id": o.object_id,
            "description": o.description,
            "mask": {"size": list(o.mask_rle["size"]), "counts": _counts_str(o.mask_rle["counts"])},
            "attributes": dict(o.attributes),
        }
        for o in record.objects
    ]
    out["questions"] = [dict(q) for q in record.questions]
    return out


def _counts_str(counts: Any) -> Any:
    return counts.decode("ascii") if isinstance(counts, bytes) else counts


@dataclass(frozen=True)
class Sample:
    """One (image, key object) pair: the unit that is traced.

    ``index`` is the sample's position in the dataset it came from (``ds[i].index == i``).
    """

    index: int
    image_id: str
    object_id: str
    description: str
    image_path: Path
    record: ImageRecord = field(repr=False)
    obj: KeyObject = field(repr=False)

    def image(self, use: ImageUse | None = None) -> Image.Image:
        """The image as `open_image` reads it: upright 8-bit RGB (loaded on each call:
        samples stay cheap to hold); for ``use``, a large one decoded reduced."""
        if not self.image_path.is_file():
            raise DatasetError(f"image {self.image_id!r}: file {self.image_path} does not exist")
        try:
            return open_image(self.image_path, use=use)
        except ImageProblem as problem:
            raise DatasetError(f"image {self.image_id!r}: file {self.image_path} {problem}") from None

    def mask(self) -> np.ndarray:
        """bool (height, width) object mask, same size as `image`."""
        return self.obj.mask()


@dataclass(frozen=True)
class Skipped:
    """A record (or one object of it) that could not be used, and why."""

    line: int
    image_id: str | None
    object_id: str | None
    reason: str

    @property
    def message(self) -> str:
        """``annotations.jsonl line 7 (image '000007', object '2'): <reason>``"""
        names = []
        if self.image_id is not None:
            names.append(f"image {self.image_id!r}")
        if self.object_id is not None:
            names.append(f"object {self.object_id!r}")
        where = f" ({', '.join(names)})" if names else ""
        return f"{ANNOTATIONS} line {self.line}{where}: {_one_line(self.reason)}"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------- dataset


class KeyObjectDataset(Sequence[Sample]):
    """The loaded, validated samples of a dataset directory.

    ``fingerprint`` identifies the content (annotations bytes and image file sizes) so a
    store can tell whether it was traced on the same data. ``notes`` are records that are
    used but deserve a look (an image with an EXIF orientation tag). ``all_descriptions``:
    every object's description in the whole dataset, kept by its splits (what VQA options
    are drawn from, so that a sample's options do not depend on the split or a limit).
    """

    def __init__(
        self,
        root: Path,
        records: list[ImageRecord],
        skipped: list[Skipped],
        fingerprint: str,
        split_name: str | None = None,
        notes: list[Skipped] | None = None,
        all_descriptions: frozenset[str] | None = None,
    ) -> None:
        self.root = root
        self.records = records
        self.skipped = skipped
        self.notes = notes or []
        self.fingerprint = fingerprint
        self.split_name = split_name
        pairs = [(r, o) for r in records for o in r.objects]
        self.samples = [
            Sample(i, r.image_id, o.object_id, o.description, root / r.file, r, o)
            for i, (r, o) in enumerate(pairs)
        ]
        self.all_descriptions = (
            all_descriptions if all_descriptions is not None else frozenset(o.description for _, o in pairs)
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):  # type: ignore[override]
        return self.samples[index]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __repr__(self) -> str:
        split = f", split={self.split_name!r}" if self.split_name else ""
        return (
            f"KeyObjectDataset({str(self.root)!r}{split}: {len(self.records)} images, "
            f"{len(self.samples)} samples, {len(self.skipped)} skipped)"
        )

    def split(self, name: str) -> KeyObjectDataset:
        """The records whose ``split`` is ``name``, re-indexed from 0."""
        if name not in SPLITS:
            raise DatasetError(f"unknown split {name!r}; splits are {', '.join(SPLITS)}")
        records = [r for r in self.records if r.split == name]
        return KeyObjectDataset(
            self.root, records, self.skipped, self.fingerprint, name, self.notes, self.all_descriptions
        )

    def split_counts(self) -> dict[str | None, int]:
        """Number of images per split (None for records without one)."""
        counts: dict[str | None, int] = {}
        for r in self.records:
            counts[r.split] = counts.get(r.split, 0) + 1
        return counts


@dataclass
class _Checks:
    """What `load_dataset` checks besides the structure of each line."""

    check_images: bool
    count_tokens: Callable[[str], int] | None
    max_description_tokens: int | None
    use: ImageUse | None = None
    notes: list[Skipped] = field(default_factory=list)


class _Bad(Exception):
    """Internal: one problem found while reading a line."""

    def __init__(self, problem: Skipped) -> None:
        self.problem = problem


def load_dataset(
    root: str | os.PathLike,
    *,
    skip_bad: bool = False,
    split: str | None = None,
    count_tokens: Callable[[str], int] | None = None,
    max_description_tokens: int | None = None,
    check_images: bool = True,
    use: ImageUse | None = None,
) -> KeyObjectDataset:
    """Read and validate a dataset directory.

    Without ``skip_bad`` the first bad record raises `DatasetError`. With it, a bad object
    is dropped (a bad image drops all its objects), recorded in ``skipped``, and loading
    goes on. ``check_images=False`` does not touch image files at all (for annotations
    whose images are not present, e.g. the paper's published masks).
    ``count_tokens`` with ``max_description_tokens`` rejects descriptions longer than that
    many tokens. ``use`` (a model adapter): an image size its processor refuses is a bad
    record, and images are decoded for the check as that model will get them (`open_image`).
    An annotations file without a single record is an error.

    >>> ds = load_dataset("data/toy", split="trace")          # doctest: +SKIP
    >>> ds[0].description, ds[0].mask().shape                   # doctest: +SKIP
    ('a red circle', (224, 224))
    """
    root = Path(root)
    if (max_description_tokens is None) != (count_tokens is None):
        raise ValueError("max_description_tokens and count_tokens must be given together")
    if split is not None and split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
    if not root.is_dir():
        raise DatasetError(f"dataset directory {root} does not exist")
    ann = root / ANNOTATIONS
    if not ann.is_file():
        raise DatasetError(f"dataset directory {root} has no {ANNOTATIONS}")
    data = ann.read_bytes()
    checks = _Checks(check_images, count_tokens, max_description_tokens, use)

    records: list[ImageRecord] = []
    skipped: list[Skipped] = []
    seen: set[str] = set()
    files: list[str] = []
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        problems: list[Skipped] = []
        try:
            record = _read_line(raw, line_no, root, checks, seen, files, problems)
        except _Bad as bad:
            problems.append(bad.problem)
            record = None
        if problems and not skip_bad:
            raise DatasetError(problems[0].message, problems[0])
        skipped.extend(problems)
        if record is not None:
            records.append(record)
    if not data.strip():
        raise DatasetError(f"{ann} has no records (the file is empty)")
    ds = KeyObjectDataset(root, records, skipped, _fingerprint(root, data, files), notes=checks.notes)
    return ds.split(split) if split is not None else ds


def check_dataset(root: str | os.PathLike, **kw: Any) -> list[Skipped]:
    """Every problem in a dataset (what ``mechhi dataset check`` prints); [] when clean."""
    return load_dataset(root, skip_bad=True, **kw).skipped


def _fingerprint(root: Path, annotations: bytes, files: list[str]) -> str:
    """Short sha256 of the annotation bytes plus the name and size of every image file."""
    h = hashlib.sha256(annotations)
    for name in sorted(set(files)):
        path = root / name
        size = path.stat().st_size if path.is_file() else -1
        h.update(f"\n{name}\t{size}".encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- one line


def _read_line(
    raw: bytes,
    line: int,
    root: Path,
    checks: _Checks,
    seen: set[str],
    files: list[str],
    problems: list[Skipped],
) -> ImageRecord:
    """Parse and validate one line; image-level problems raise `_Bad`, object-level
    problems are appended to ``problems`` and the object is left out."""

    def bad(reason: str, image_id: str | None = None) -> _Bad:
        return _Bad(Skipped(line, image_id, None, reason))

    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise bad(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise bad(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object, got {type(obj).__name__}")
    image_id = obj.get("image_id")
    if not isinstance(image_id, str) or not image_id:
        raise bad(f"image_id must be a non-empty string, got {image_id!r}")
    missing = [k for k in RECORD_KEYS if k not in obj]
    if missing:
        raise bad(f"missing key(s) {', '.join(missing)}", image_id)
    if image_id in seen:
        raise bad("duplicate image_id", image_id)
    seen.add(image_id)
    if isinstance(obj["file"], str):
        files.append(obj["file"])
    width, height = _image_fields(obj, lambda r: bad(r, image_id))
    refused = checks.use.image_size_problem((width, height)) if checks.use is not None else None
    if refused:
        raise bad(
            f"the model's processor refuses a {height}x{width} image (HxW): {_one_line(refused)}", image_id
        )
    if checks.check_images:
        tag = _check_image_file(root, obj["file"], width, height, lambda r: bad(r, image_id), checks.use)
        if tag != 1:
            checks.notes.append(
                Skipped(
                    line,
                    image_id,
                    None,
                    f"image file {obj['file']} has EXIF orientation {tag}: "
                    "it is used upright, so width, height and masks must be as displayed",
                )
            )
        limit = Image.MAX_IMAGE_PIXELS
        if limit and width * height > limit:
            checks.notes.append(
                Skipped(
                    line,
                    image_id,
                    None,
                    f"{LARGE_IMAGE}: {obj['file']} is {height}x{width} "
                    f"({width * height / 1e6:.3g} Mpx, over Pillow's decompression-bomb limit of "
                    f"{limit / 1e6:.3g} Mpx); a model gets it decoded reduced to the size it resizes to",
                )
            )

    objects = []
    object_ids: set[str] = set()
    for raw_obj in obj["objects"]:
        oid = raw_obj.get("object_id") if isinstance(raw_obj, dict) else None
        oid = oid if isinstance(oid, str) else None
        try:
            objects.append(_read_object(raw_obj, height, width, checks, object_ids))
        except ValueError as e:
            problems.append(Skipped(line, image_id, oid, str(e)))
        if oid is not None:
            object_ids.add(oid)
    kept_ids = {o.object_id for o in objects}
    questions = _read_questions(obj.get("questions"), kept_ids, object_ids, line, image_id, problems)
    return ImageRecord(
        image_id=image_id,
        file=obj["file"],
        width=width,
        height=height,
        caption=obj.get("caption"),
        objects=tuple(objects),
        questions=questions,
        split=obj.get("split"),
    )


def _image_fields(obj: dict, bad: Callable[[str], _Bad]) -> tuple[int, int]:
    """(width, height) after checking the image-level fields' types."""
    if not isinstance(obj["file"], str) or not obj["file"]:
        raise bad(f"file must be a non-empty string, got {obj['file']!r}")
    if Path(obj["file"]).is_absolute() or ".." in Path(obj["file"]).parts:
        raise bad(f"file must be a path inside the dataset directory, got {obj['file']!r}")
    width, height = obj["width"], obj["height"]
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise bad(f"{name} must be a positive integer, got {v!r}")
    if obj.get("caption") is not None and not isinstance(obj["caption"], str):
        raise bad(f"caption must be a string or null, got {type(obj['caption']).__name__}")
    if obj.get("split") is not None and obj["split"] not in SPLITS:
        raise bad(f"split must be one of {', '.join(SPLITS)}, got {obj['split']!r}")
    if not isinstance(obj["objects"], list):
        raise bad(f"objects must be a list, got {type(obj['objects']).__name__}")
    return width, height


def _check_image_file(
    root: Path, file: str, width: int, height: int, bad: Callable[[str], _Bad], use: ImageUse | None
) -> int:
    """Check that the image decodes in full (as `open_image` reads it for ``use``) at the
    record's size as displayed; return its EXIF orientation."""
    path = root / file
    if not path.is_file():
        raise bad(f"image file {file} does not exist")
    try:
        with _quiet_bombs(), Image.open(path) as im:
            (w, h), tag = _upright_size(im), orientation(im)
        open_image(path, use=use if (w, h) == (width, height) else None)
    except (OSError, Image.DecompressionBombError) as e:
        raise bad(f"image file {file} cannot be read ({_one_line(e)})") from None
    except ImageProblem as problem:
        raise bad(f"image file {file} {problem}") from None
    if (w, h) != (width, height):
        upright = " upright (EXIF orientation applied)" if tag in (5, 6, 7, 8) else ""
        raise bad(f"image file {file} is {h}x{w}{upright} but the record says {height}x{width} (HxW)")
    return tag


def _read_object(raw: Any, height: int, width: int, checks: _Checks, earlier_ids: set[str]) -> KeyObject:
    """One validated key object; ValueError with the reason if it cannot be used."""
    if not isinstance(raw, dict):
        raise ValueError(f"object must be a JSON object, got {type(raw).__name__}")
    missing = [k for k in OBJECT_KEYS if k not in raw]
    if missing:
        raise ValueError(f"object is missing key(s) {', '.join(missing)}")
    oid, desc = raw["object_id"], raw["description"]
    if not isinstance(oid, str) or not oid:
        raise ValueError(f"object_id must be a non-empty string, got {oid!r}")
    if oid in earlier_ids:
        raise ValueError("duplicate object_id in this image")
    if not isinstance(desc, str) or not desc.strip():
        raise ValueError(f"description is empty ({desc!r})")
    if checks.count_tokens is not None and checks.max_description_tokens is not None:
        n = checks.count_tokens(desc)
        if n > checks.max_description_tokens:
            raise ValueError(
                f"description is {n} tokens, more than the limit of {checks.max_description_tokens}"
            )
    attributes = raw.get("attributes") or {}
    if not isinstance(attributes, dict):
        raise ValueError(f"attributes must be an object, got {type(attributes).__name__}")
    h, w = _check_rle(raw["mask"])
    if (h, w) != (height, width):
        raise ValueError(f"mask is {h}x{w} but the image is {height}x{width} (HxW)")
    rle = {"size": [h, w], "counts": raw["mask"]["counts"]}
    if isinstance(rle["counts"], list):  # normalise to the compressed form
        rle = encode_mask(decode_mask(rle))
    if coco_mask.area({"size": [h, w], "counts": rle["counts"].encode("ascii")}) == 0:
        raise ValueError("mask is empty")
    return KeyObject(oid, desc, rle, dict(attributes))


def _read_questions(
    raw: Any,
    kept_ids: set[str],
    all_ids: set[str],
    line: int,
    image_id: str,
    problems: list[Skipped],
) -> tuple[dict, ...]:
    """Valid closed-ended questions; a bad one is reported and left out, one about an
    object that was skipped is left out silently (the object was already reported)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _Bad(Skipped(line, image_id, None, "questions must be a list"))
    out = []
    for i, q in enumerate(raw):
        oid = q.get("object_id") if isinstance(q, dict) else None
        reason = _question_problem(q, all_ids)
        if reason is not None:
            problems.append(
                Skipped(line, image_id, oid if isinstance(oid, str) else None, f"question {i}: {reason}")
            )
        elif oid is None or oid in kept_ids:
            out.append(dict(q))
    return tuple(out)


def _question_problem(q: Any, object_ids: set[str]) -> str | None:
    if not isinstance(q, dict):
        return "must be a JSON object"
    if not isinstance(q.get("question"), str) or not q["question"].strip():
        return "question text is missing or empty"
    options = q.get("options")
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
        return "options must be a list of at least two strings"
    answer = q.get("answer")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(options):
        return f"answer must be an index into the {len(options)} options, got {answer!r}"
    if q.get("object_id") is not None and q["object_id"] not in object_ids:
        return f"object_id {q['object_id']!r} is not an object of this image"
    return None


# ----------------------------------------------------------------------------- writer


class DatasetWriter:
    """Streaming, resumable writer used by every dataset builder.

    Each `add` saves the image, then appends one line and flushes, so an interruption
    loses at most the record being written. Reopening a directory whose
    ``annotations.jsonl`` exists resumes: ``done_ids`` holds the image ids already
    written (a torn last line is cut off) and builders skip them.

    >>> with DatasetWriter("data/toy") as w:                    # doctest: +SKIP
    ...     for record, image in generate(10, seed=0):
    ...         if record.image_id not in w.done_ids:
    ...             w.add(record, image)
    """

    def __init__(self, root: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.root = Path(root)
        (self.root / IMAGES).mkdir(parents=True, exist_ok=True)
        self.path = self.root / ANNOTATIONS
        self.done_ids: set[str] = set()
        if self.path.exists() and not overwrite:
            self.done_ids = _resume(self.path)
        self._fh = self.path.open("w" if overwrite else "a", encoding="utf-8")

    def add(self, record: ImageRecord, image: Image.Image | str | os.PathLike) -> None:
        """Write ``image`` to images/<image_id>.<ext> and append ``record`` (its ``file``
        is set to where the image went). Sizes are checked first, so a bad record is
        never written."""
        if self._fh.closed:
            raise DatasetError(f"writer for {self.root} is closed")
        image_id = record.image_id
        if not isinstance(image_id, str) or not _SAFE_ID.match(image_id):
            raise DatasetError(f"image_id {image_id!r} is not usable as a file name")
        if image_id in self.done_ids:
            raise DatasetError(f"image {image_id!r} is already in {self.path}")
        size = image.size if isinstance(image, Image.Image) else _image_size(Path(image))
        _check_record_sizes(record, size)
        file = self._save_image(image_id, image)
        line = json.dumps(record_to_json(replace(record, file=file)), ensure_ascii=False)
        self._fh.write(line + "\n")
        self._fh.flush()
        self.done_ids.add(image_id)

    def _save_image(self, image_id: str, image: Image.Image | str | os.PathLike) -> str:
        """Write via a temporary name and rename, so a crash never leaves half an image."""
        if isinstance(image, Image.Image):
            rel = f"{IMAGES}/{image_id}.png"
            tmp = self.root / (rel + ".tmp")
            image.save(tmp, format="PNG")
        else:
            src = Path(image)
            rel = f"{IMAGES}/{image_id}{src.suffix.lower() or '.png'}"
            tmp = self.root / (rel + ".tmp")
            shutil.copyfile(src, tmp)
        os.replace(tmp, self.root / rel)
        return rel

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _resume(path: Path) -> set[str]:
    """Image ids already in ``path``; a torn last line (no newline) is truncated away."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with path.open("r+b") as fh:
            fh.truncate(keep)
        data = data[:keep]
    done = set()
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            done.add(json.loads(raw)["image_id"])
        except (ValueError, KeyError, TypeError):
            raise DatasetError(
                f"{ANNOTATIONS} line {line_no}: cannot resume writing {path}, the line is "
                "not a record (fix it, or start over with --overwrite; overwrite=True in Python)"
            ) from None
    return done


def _image_size(path: Path) -> tuple[int, int]:
    if not path.is_file():
        raise DatasetError(f"image file {path} does not exist")
    return image_size(path)


def _check_record_sizes(record: ImageRecord, size: tuple[int, int]) -> None:
    w, h = size
    where = f"image {record.image_id!r}"
    if (w, h) != (record.width, record.height):
        raise DatasetError(
            f"{where}: image is {h}x{w} but the record says {record.height}x{record.width} (HxW)"
        )
    for o in record.objects:
        mh, mw = o.mask_rle["size"]
        if (mh, mw) != (h, w):
            raise DatasetError(
                f"{where}, object {o.object_id!r}: mask is {mh}x{mw} but the image is {h}x{w} (HxW)"
            )
