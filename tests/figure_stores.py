"""Small stores for the figure and report tests: traced and scored on chosen or random
attention, optionally over a real dataset of flat-coloured images with one object each
(so a figure's pixels can be checked against known colours)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr
from PIL import Image

from mechhi.data.format import DatasetWriter, ImageRecord, KeyObject, load_dataset
from mechhi.store import SampleMeta, create_store, open_store, pad_grid, write_batch
from probes.head_impact import score_store

BACKGROUND = (40, 90, 200)  # the images' colour outside the object
OBJECT = (30, 190, 60)  # "a green square"
SIDE = 64  # image side in pixels; 4 x 4 tokens of 16 px


def make_store(
    path: Path,
    *,
    n_layers: int,
    n_heads: int,
    grids: list[tuple[int, int]],
    seed: int = 0,
    model: str = "toy/model",
    dataset: str = "/nowhere#0",
    template: str = "t",
    attention=None,
    coverage=None,
    image_ids: list[str] | None = None,
    maps: bool = True,
    score: bool = True,
) -> xr.Dataset:
    """A traced (and scored) store; random attention/coverage unless given per sample."""
    rng = np.random.default_rng(seed)
    ids = image_ids or [f"img{i}" for i in range(len(grids))]
    metas = [SampleMeta(ids[i], "0", f"object {i}", {"image": g}) for i, g in enumerate(grids)]
    attrs = {"model": model, "model_revision": "r0", "dtype": "float32", "prompt_template": template, "dataset": dataset}
    create_store(path, samples=metas, n_layers=n_layers, n_heads=n_heads, attrs=attrs, maps=maps)
    rows, cols = max(g[0] for g in grids), max(g[1] for g in grids)
    att = attention or [rng.random((n_layers, n_heads) + g) for g in grids]
    cov = coverage or [rng.random(g) for g in grids]
    write_batch(
        path,
        list(range(len(grids))),
        attention={"image": np.stack([pad_grid(a, rows, cols) for a in att])} if maps else None,
        mask={"image": np.stack([pad_grid(c, rows, cols) for c in cov])},
        iou=None if maps else rng.random((len(grids), n_layers, n_heads)),
    )
    if score:
        score_store(path)
    return open_store(path)


def object_mask(k: int) -> np.ndarray:
    """Image k's object: a square of 2 x 2 tokens whose position moves with k."""
    mask = np.zeros((SIDE, SIDE), bool)
    r, c = 16 * (k % 3), 16 * ((k + 1) % 3)
    mask[r : r + 32, c : c + 32] = True
    return mask


def make_dataset(root: Path, n: int) -> str:
    """n flat images (BACKGROUND, with an OBJECT square) -> the store's dataset reference."""
    with DatasetWriter(root) as writer:
        for k in range(n):
            mask = object_mask(k)
            pixels = np.where(mask[..., None], OBJECT, BACKGROUND).astype(np.uint8)
            obj = KeyObject.from_mask("0", "a green square", mask)
            writer.add(ImageRecord(f"img{k}", "", SIDE, SIDE, None, (obj,)), Image.fromarray(pixels))
    return f"{root}#{load_dataset(root).fingerprint}"


def store_with_images(tmp_path: Path, *, n: int = 5, n_layers: int = 4, n_heads: int = 3, seed: int = 0,
                      model: str = "/abs/path/to/toy-model") -> xr.Dataset:  # fmt: skip
    """A scored store over `make_dataset`: 4 x 4 token grids, the coverage exact for each object."""
    dataset = make_dataset(tmp_path / "data", n)
    coverage = [object_mask(k).reshape(4, 16, 4, 16).mean(axis=(1, 3)) for k in range(n)]
    return make_store(tmp_path / "s.zarr", n_layers=n_layers, n_heads=n_heads, grids=[(4, 4)] * n, seed=seed,
                      model=model, dataset=dataset, coverage=coverage)  # fmt: skip
