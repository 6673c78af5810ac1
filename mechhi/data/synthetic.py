"""A seeded toy world of coloured shapes, with exact masks, for the bundled toy model.

Why a toy world: Head Impact compares attention with object masks, and on real data the
masks come from a segmentation model and are themselves uncertain. Here every mask is
exact by construction, so a wrong IoU can only come from mechhi.

How exactness is kept: each shape is rasterised once, with PIL, onto its own mask layer;
the image pixels under that mask are then set to the object's colour. Objects never
overlap (their boxes are kept ``gap`` pixels apart), so the mask is exactly the visible
object. Background pixels are kept inside the channel range [64, 192] while every object
colour has a channel outside it, so no background pixel can have an object's colour:
the pixels of colour c are exactly the union of the masks of the objects coloured c.
The background is also kept at least ``min_contrast`` (RGB distance) away from every
object colour of its scene, so objects stay clearly visible.

Everything is a deterministic function of ``(seed, image index)``: image i draws from
``np.random.default_rng([seed, i])``, so a build can resume, or be extended, without
re-rendering earlier images and without changing them.

Sizes are given at 224 px and scaled with ``image_size``: "small" is 30-45 px across
(one or two 28 px visual tokens), "large" 70-100 px (three or four tokens).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mechhi.data.format import SPLITS, DatasetError, DatasetWriter, ImageRecord, KeyObject
from mechhi.progress import tracked

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
# Every colour has a channel below 64, outside the background range [64, 192].
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 80, 220),
    "yellow": (240, 210, 30),
    "purple": (150, 50, 200),
    "orange": (245, 140, 20),
}
SIZES = ("small", "large")
BACKGROUNDS = ("solid", "gradient", "noise")
BG_LOW, BG_HIGH = 64, 192  # background channel range, disjoint from object colours
QUESTION = "What is shown in this photo?"
# the paper's split: 1000 images traced, 1200 / 300 / 500 for fine-tuning
DEFAULT_SPLITS = {"trace": 1 / 3, "train": 0.4, "val": 0.1, "test": 1 / 6}
META_FILE = "synthetic.json"


@dataclass(frozen=True)
class WorldConfig:
    """What a scene may contain. Pixel sizes are at 224 px and scale with ``image_size``."""

    image_size: int = 224
    min_objects: int = 1
    max_objects: int = 3
    # Four shapes that stay distinct at 30 px on a 28 px token grid; diamond and hexagon
    # (too close to square and circle at that size) are available but not drawn by default.
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "star")
    colours: tuple[str, ...] = tuple(COLOURS)
    sizes: tuple[str, ...] = SIZES
    backgrounds: tuple[str, ...] = BACKGROUNDS
    small_px: tuple[int, int] = (30, 45)  # side of the shape's box, inclusive range
    large_px: tuple[int, int] = (70, 100)
    gap_px: int = 6  # minimum distance between two objects' boxes
    min_contrast: float = 110.0  # RGB distance between background and object colours
    describe_size: bool = False  # "a large red circle" instead of "a red circle"

    def __post_init__(self) -> None:
        for name, chosen, known in (
            ("shapes", self.shapes, SHAPES),
            ("colours", self.colours, tuple(COLOURS)),
            ("sizes", self.sizes, SIZES),
            ("backgrounds", self.backgrounds, BACKGROUNDS),
        ):
            unknown = [c for c in chosen if c not in known]
            if unknown or not chosen:
                raise ValueError(f"WorldConfig.{name}: {unknown or 'empty'}; choose from {', '.join(known)}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                "WorldConfig: need 1 <= min_objects <= max_objects, "
                f"got {self.min_objects}, {self.max_objects}"
            )
        if self.max_objects > len(self.shapes) * len(self.colours):
            raise ValueError("WorldConfig: max_objects exceeds the distinct (colour, shape) pairs")
        if self.image_size < 32:
            raise ValueError(f"WorldConfig.image_size must be at least 32, got {self.image_size}")
        if len(all_descriptions(self)) < 4:
            raise ValueError("WorldConfig: fewer than 4 descriptions, cannot make 4-option questions")

    def side_range(self, size: str) -> tuple[int, int]:
        """Inclusive range of box sides in pixels at this image size."""
        lo, hi = self.small_px if size == "small" else self.large_px
        scale = self.image_size / 224
        return max(4, round(lo * scale)), max(4, round(hi * scale))


def describe(colour: str, shape: str, size: str | None = None) -> str:
    """'a red circle', 'an orange star', 'a large orange star' (with ``size``)."""
    words = f"{size} {colour} {shape}" if size else f"{colour} {shape}"
    return ("an " if words[0] in "aeiou" else "a ") + words


def all_descriptions(config: WorldConfig) -> list[str]:
    """Every description the world can produce (the pool for VQA distractors)."""
    sizes = config.sizes if config.describe_size else (None,)
    return [describe(c, s, z) for z in sizes for c in config.colours for s in config.shapes]


# ----------------------------------------------------------------------------- scenes


def render_scene(
    rng: np.random.Generator, config: WorldConfig = WorldConfig(), edit: dict[int, dict] | None = None
) -> tuple[Image.Image, list[dict]]:
    """One image and its objects: dicts with shape, colour, size, box (x0, y0, x1, y1
    exclusive), mask (bool HxW, exactly the object's pixels) and description.

    Objects have distinct (colour, shape), so each description names one object.
    ``edit`` ({object index: {"colour": c} | {"shape": s} | {"remove": True}}) changes only
    how those objects are drawn: every random draw (objects, boxes, background) is the
    unedited scene's, so the image is its exact counterfactual; the objects returned are
    the unedited ones.
    """
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    pairs = [(c, s) for c in config.colours for s in config.shapes]
    picks = [pairs[i] for i in rng.choice(len(pairs), size=n, replace=False)]
    boxes: list[tuple[int, int, int, int]] = []
    objects = []
    for colour, shape in picks:
        size = str(rng.choice(config.sizes))
        box = _place(rng, config, size, boxes)
        if box is None:  # no room left: the scene keeps fewer objects
            continue
        boxes.append(box)
        mask = _shape_mask(shape, box, config.image_size)
        objects.append(
            {
                "shape": shape,
                "colour": colour,
                "size": size,
                "box": box,
                "mask": mask,
                "description": describe(colour, shape, size if config.describe_size else None),
            }
        )
    pixels = _background(rng, config, [COLOURS[o["colour"]] for o in objects])  # (S, S, 3) uint8
    for k, o in enumerate(objects):
        change = (edit or {}).get(k, {})
        if change.get("remove"):
            continue
        mask = _shape_mask(change["shape"], o["box"], config.image_size) if "shape" in change else o["mask"]
        pixels[mask] = COLOURS[change.get("colour", o["colour"])]
    return Image.fromarray(pixels), objects


COUNTERFACTUALS = ("colour", "shape", "remove")


def render_counterfactual(
    index: int, object_index: int, change: str, *, seed: int, config: WorldConfig = WorldConfig()
) -> tuple[Image.Image, str | None]:
    """Image ``index`` of the world ``seed`` with object ``object_index`` recoloured, reshaped
    (to a colour / shape no object of the scene has, drawn from a generator seeded by the
    image and the object) or removed, everything else identical; and the changed object's
    description (None when removed)."""
    if change not in COUNTERFACTUALS:
        raise ValueError(f"unknown counterfactual {change!r}; choose from {', '.join(COUNTERFACTUALS)}")
    _, objects = render_scene(np.random.default_rng([seed, index]), config)
    if not 0 <= object_index < len(objects):
        raise ValueError(f"image {index} has {len(objects)} objects; no object {object_index}")
    obj = objects[object_index]
    rng = np.random.default_rng([seed, index, object_index, 1])
    edit: dict[str, Any] = {"remove": True}
    if change != "remove":
        used = {o[change] for o in objects}
        choices = [c for c in (config.colours if change == "colour" else config.shapes) if c not in used]
        if not choices:
            raise ValueError(f"image {index}: every {change} is taken, no counterfactual {change} left")
        edit = {change: str(rng.choice(choices))}
    image, _ = render_scene(np.random.default_rng([seed, index]), config, edit={object_index: edit})
    if change == "remove":
        return image, None
    attributes = {"colour": obj["colour"], "shape": obj["shape"], change: edit[change]}
    size = obj["size"] if config.describe_size else None
    return image, describe(attributes["colour"], attributes["shape"], size)


def _place(
    rng: np.random.Generator,
    config: WorldConfig,
    size: str,
    boxes: list[tuple[int, int, int, int]],
    tries: int = 100,
) -> tuple[int, int, int, int] | None:
    """A square box for a new object, ``gap`` pixels clear of the others, or None."""
    lo, hi = config.side_range(size)
    gap = max(1, round(config.gap_px * config.image_size / 224))
    for _ in range(tries):
        side = int(rng.integers(lo, hi + 1))
        x0 = int(rng.integers(1, config.image_size - side))
        y0 = int(rng.integers(1, config.image_size - side))
        box = (x0, y0, x0 + side, y0 + side)
        if all(_apart(box, b, gap) for b in boxes):
            return box
    return None


def _apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _shape_mask(shape: str, box: tuple[int, int, int, int], image_size: int) -> np.ndarray:
    """bool (S, S) mask of ``shape`` drawn inside ``box`` (x1, y1 exclusive)."""
    x0, y0, x1, y1 = box
    layer = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(layer)
    inclusive = (x0, y0, x1 - 1, y1 - 1)  # PIL boxes include their last pixel
    if shape == "circle":
        draw.ellipse(inclusive, fill=255)
    elif shape == "square":
        draw.rectangle(inclusive, fill=255)
    else:
        draw.polygon(_polygon(shape, inclusive), fill=255)
    mask = np.asarray(layer) > 0
    inside = np.zeros_like(mask)
    inside[y0:y1, x0:x1] = True
    assert mask.any() and not (mask & ~inside).any(), (shape, box)  # kept apart by boxes
    return mask


def _polygon(shape: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "hexagon":
        angles = [math.pi / 3 * k for k in range(6)]
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
    if shape == "star":  # five points, inner radius 0.45 of the outer, first point up
        return [
            (cx + rad * math.cos(a), cy + rad * math.sin(a))
            for k in range(10)
            for rad, a in [(r if k % 2 == 0 else 0.45 * r, -math.pi / 2 + math.pi / 5 * k)]
        ]
    raise ValueError(f"unknown shape {shape!r}; shapes are {', '.join(SHAPES)}")


# ----------------------------------------------------------------------------- backgrounds


def _background(
    rng: np.random.Generator, config: WorldConfig, colours: list[tuple[int, int, int]]
) -> np.ndarray:
    """(S, S, 3) uint8 background, every pixel in [BG_LOW, BG_HIGH] and far from ``colours``."""
    kind = str(rng.choice(config.backgrounds))
    s = config.image_size
    if kind == "solid":
        base = _far_colour(rng, colours, config.min_contrast)
        out = np.broadcast_to(base, (s, s, 3)).astype(np.float64)
    elif kind == "gradient":
        a = _far_colour(rng, colours, config.min_contrast)
        b = _far_colour(rng, colours, config.min_contrast, segment_from=a)
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:s, 0:s] / max(s - 1, 1)
        t = xx * math.cos(angle) + yy * math.sin(angle)  # (S, S) position along the gradient
        t = (t - t.min()) / (t.max() - t.min())
        out = a * (1 - t[..., None]) + b * t[..., None]
    else:  # low-contrast texture: coarse blotches plus fine grain around one colour
        # The texture needs a base colour farther from the objects; some colour triples
        # leave no such colour, and then the texture gets fainter (down to none).
        for amplitude in (18.0, 9.0, 0.0):
            base = _far_colour(rng, colours, config.min_contrast + 2 * amplitude, required=amplitude == 0.0)
            if base is not None:
                break
        if amplitude == 0.0:
            out = np.broadcast_to(base, (s, s, 3)).astype(np.float64)
        else:
            cells = int(rng.integers(4, 12))
            coarse = rng.uniform(-amplitude, amplitude, size=(cells, cells, 3))
            coarse = (
                np.asarray(  # bilinear upsampling of the coarse noise, (S, S, 3)
                    Image.fromarray(((coarse + amplitude) * (255 / (2 * amplitude))).astype(np.uint8)).resize(
                        (s, s), Image.BILINEAR
                    ),
                    dtype=np.float64,
                )
                * (2 * amplitude / 255)
                - amplitude
            )
            fine = rng.uniform(-amplitude / 3, amplitude / 3, size=(s, s, 3))
            out = base + coarse + fine
    return np.clip(np.rint(out), BG_LOW, BG_HIGH).astype(np.uint8)


def _far_colour(
    rng: np.random.Generator,
    colours: list[tuple[int, int, int]],
    distance: float,
    segment_from: np.ndarray | None = None,
    tries: int = 1000,
    required: bool = True,
) -> np.ndarray | None:
    """A background colour at least ``distance`` from every colour in ``colours``; with
    ``segment_from``, the whole segment between the two colours is (a gradient's path).
    None when there is none and it is not ``required``."""
    targets = np.asarray(colours, dtype=np.float64).reshape(-1, 3)
    for _ in range(tries):
        c = rng.integers(BG_LOW, BG_HIGH + 1, size=3).astype(np.float64)
        path = c[None] if segment_from is None else np.linspace(segment_from, c, 9)
        if len(targets) == 0 or np.linalg.norm(path[:, None] - targets[None], axis=-1).min() >= distance:
            return c
    if not required:
        return None
    raise RuntimeError(f"no background colour {distance} away from {colours}; lower min_contrast")


# ----------------------------------------------------------------------------- records


def make_record(
    image_id: str, objects: list[dict], rng: np.random.Generator, *, config: WorldConfig = WorldConfig()
) -> ImageRecord:
    """The dataset record of a rendered scene: caption "a red circle and a blue square",
    one key object per shape, and per object a 4-option question whose three
    distractors describe nothing in the image."""
    height, width = objects[0]["mask"].shape
    key_objects = tuple(
        KeyObject.from_mask(
            str(k),
            o["description"],
            o["mask"],
            {"shape": o["shape"], "colour": o["colour"], "size": o["size"]},
        )
        for k, o in enumerate(objects)
    )
    present = {o["description"] for o in objects}
    pool = [d for d in all_descriptions(config) if d not in present]
    questions = []
    for obj in key_objects:
        distractors = [pool[i] for i in rng.choice(len(pool), size=3, replace=False)]
        options = [obj.description, *distractors]
        order = rng.permutation(4)
        options = [options[i] for i in order]
        questions.append(
            {
                "question": QUESTION,
                "options": options,
                "answer": int(np.flatnonzero(order == 0)[0]),
                "object_id": obj.object_id,
            }
        )
    return ImageRecord(
        image_id=image_id,
        file=f"images/{image_id}.png",
        width=int(width),
        height=int(height),
        caption=caption([o["description"] for o in objects]),
        objects=key_objects,
        questions=tuple(questions),
    )


def caption(descriptions: list[str]) -> str:
    """["a", "b", "c"] -> "a, b and c"."""
    if len(descriptions) <= 1:
        return "".join(descriptions)
    return ", ".join(descriptions[:-1]) + " and " + descriptions[-1]


def render_one(
    index: int, *, seed: int, config: WorldConfig = WorldConfig()
) -> tuple[ImageRecord, Image.Image]:
    """Image ``index`` of the world ``seed``; independent of every other index."""
    rng = np.random.default_rng([seed, index])
    image, objects = render_scene(rng, config)
    return make_record(image_id(index), objects, rng, config=config), image


def image_id(index: int) -> str:
    return f"{index:06d}"


def generate(
    n_images: int, *, seed: int, config: WorldConfig = WorldConfig()
) -> Iterator[tuple[ImageRecord, Image.Image]]:
    """(record, image) for images 0..n-1, the same bytes for the same seed and config.

    >>> record, image = next(generate(1, seed=0))
    >>> record.objects[0].description                           # doctest: +SKIP
    'a red circle'
    """
    for i in range(n_images):
        yield render_one(i, seed=seed, config=config)


# ----------------------------------------------------------------------------- building


def assign_splits(n_images: int, *, seed: int, splits: dict[str, float] | None = None) -> list[str]:
    """Split of each image: exact quotas (largest remainder), at least one image for every
    split with a positive fraction when there are enough images, shuffled by ``seed``.
    A function of (seed, n_images, splits): the same call always gives the same list."""
    splits = dict(DEFAULT_SPLITS if splits is None else splits)
    unknown = [k for k in splits if k not in SPLITS]
    if unknown or any(v < 0 for v in splits.values()) or sum(splits.values()) <= 0:
        raise ValueError(
            f"splits must map names in {', '.join(SPLITS)} to non-negative fractions, got {splits}"
        )
    total = sum(splits.values())
    names = list(splits)
    exact = np.array([splits[k] / total * n_images for k in names])
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n_images - counts.sum()]:
        counts[i] += 1
    wanted = [i for i, k in enumerate(names) if splits[k] > 0]
    for i in wanted:  # give every wanted split one image, taken from the largest
        if counts[i] == 0 and n_images >= len(wanted):
            counts[int(np.argmax(counts))] -= 1
            counts[i] += 1
    labels = [name for name, c in zip(names, counts, strict=True) for _ in range(c)]
    order = np.random.default_rng([seed, 2**31]).permutation(n_images)  # stream apart from images'
    return [labels[i] for i in order]


# The generator's name in every build's synthetic.json (from when the world lived in
# mechhi.data): kept, so that builds made before the move still resume.
GENERATOR = "mechhi.data.synthetic"


def build_synthetic(
    out_dir: str | os.PathLike,
    *,
    n_images: int,
    seed: int = 0,
    splits: dict[str, float] | None = None,
    config: WorldConfig = WorldConfig(),
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the toy dataset to ``out_dir`` (resuming an interrupted build of the same
    parameters; different parameters need ``overwrite=True``). Returns ``out_dir``.

    >>> build_synthetic("data/toy", n_images=300, seed=0)        # doctest: +SKIP
    """
    out = Path(out_dir)
    labels = assign_splits(n_images, seed=seed, splits=splits)
    meta = {
        "generator": GENERATOR,
        "n_images": n_images,
        "seed": seed,
        "splits": dict(DEFAULT_SPLITS if splits is None else splits),
        "config": dataclasses.asdict(config),
    }
    meta = json.loads(json.dumps(meta))  # tuples -> lists, as they read back
    _check_meta(out, meta, overwrite)
    with DatasetWriter(out, overwrite=overwrite) as writer:
        (out / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        todo = [i for i in range(n_images) if image_id(i) not in writer.done_ids]
        for i in tracked(todo, f"synthetic images -> {out}", show=progress):
            record, image = render_one(i, seed=seed, config=config)
            writer.add(dataclasses.replace(record, split=labels[i]), image)
    return out


def _check_meta(out: Path, meta: dict[str, Any], overwrite: bool) -> None:
    path = out / META_FILE
    if overwrite:
        return
    if not path.is_file():
        if (out / "annotations.jsonl").is_file():
            raise DatasetError(
                f"{out} holds a dataset that is not a synthetic build; "
                "build into another --out, or start over with --overwrite (overwrite=True in Python)"
            )
        return
    old = json.loads(path.read_text())
    if old != meta:
        diff = sorted(k for k in meta if old.get(k) != meta[k])
        raise DatasetError(
            f"{out} holds a synthetic build with different {', '.join(diff)}; "
            "build into another --out, or rebuild with --overwrite (overwrite=True in Python)"
        )
