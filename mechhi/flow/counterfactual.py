"""A clean and a corrupted image of one sample, for activation and attribution patching.

Patching asks which sites carry what differs between two runs, so the two inputs must
differ only in the thing asked about. The toy world renders *exact* counterfactuals: the
same scene (every random draw replayed) with the key object recoloured, reshaped or
removed (`mechhi.data.synthetic.render_counterfactual`), and the recoloured or reshaped
object has a counterfactual description, whose first differing token gives the logit
difference metric. Any dataset can be corrupted over the object's mask instead: Gaussian
noise (seeded per sample) or a blur; there is no counterfactual word then, and the metric
is the clean description's log-probability.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from mechhi.data.format import Sample
from mechhi.data.synthetic import WorldConfig, render_counterfactual

TOY_CHANGES = ("colour", "shape", "remove")
MASK_CHANGES = ("noise", "blur")
CHANGES = (*TOY_CHANGES, *MASK_CHANGES)
SYNTHETIC_META = "synthetic.json"  # written by the toy world's dataset build


@dataclass(frozen=True)
class Pair:
    """One sample's clean and corrupted image; ``counter``: the description the corrupted
    image shows (None when it shows nothing nameable: removed, noised, blurred)."""

    sample: Sample
    clean: Image.Image
    corrupted: Image.Image
    counter: str | None


def make_pair(
    sample: Sample,
    change: str,
    *,
    dataset: str | Path,
    seed: int = 0,
    noise_sd: float = 0.5,
    blur_radius: float = 8.0,
) -> Pair:
    """The sample's clean image and its ``change`` d counterpart (module doc)."""
    if change not in CHANGES:
        raise ValueError(f"unknown --change {change!r}; choose from {', '.join(CHANGES)}")
    clean = sample.image()
    if change in TOY_CHANGES:
        corrupted, counter = _toy_counterfactual(sample, change, Path(dataset))
        return Pair(sample, clean, corrupted, counter)
    mask = sample.mask()
    if change == "noise":
        rng = np.random.default_rng([seed, sample.index])
        pixels = np.asarray(clean, dtype=np.float64)
        noise = rng.normal(0.0, noise_sd * 255.0, size=pixels.shape)
        pixels[mask] = np.clip(pixels[mask] + noise[mask], 0, 255)
        corrupted = Image.fromarray(np.rint(pixels).astype(np.uint8))
    else:
        blurred = np.asarray(clean.filter(ImageFilter.GaussianBlur(blur_radius)))
        pixels = np.asarray(clean).copy()
        pixels[mask] = blurred[mask]
        corrupted = Image.fromarray(pixels)
    return Pair(sample, clean, corrupted, None)


def _toy_counterfactual(sample: Sample, change: str, dataset: Path) -> tuple[Image.Image, str | None]:
    meta_path = dataset / SYNTHETIC_META
    if not meta_path.is_file():
        raise ValueError(
            f"--change {change} needs a toy-world dataset ({dataset} has no {SYNTHETIC_META}); "
            f"use --change {' or '.join(MASK_CHANGES)} on other data"
        )
    meta = json.loads(meta_path.read_text())
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    config = WorldConfig(**fields)
    image, counter = render_counterfactual(
        int(sample.image_id), int(sample.object_id), change, seed=int(meta["seed"]), config=config
    )
    if image.size != sample.image().size:
        raise ValueError(f"sample {sample.index}: the re-rendered scene differs from the dataset's image")
    return image, counter
