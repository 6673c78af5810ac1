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
    attrs = {
        "model": model,
        "model_revision": "r0",
        "dtype": "float32",
        "prompt_template": template,
        "dataset": dataset,
    }
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


def store_with_images(
    tmp_path: Path,
    *,
    n: int = 5,
    n_layers: int = 4,
    n_heads: int = 3,
    seed: int = 0,
    model: str = "/abs/path/to/toy-model",
) -> xr.Dataset:
    """A scored store over `make_dataset`: 4 x 4 token grids, the coverage exact for each object."""
    dataset = make_dataset(tmp_path / "data", n)
    coverage = [object_mask(k).reshape(4, 16, 4, 16).mean(axis=(1, 3)) for k in range(n)]
    return make_store(
        tmp_path / "s.zarr",
        n_layers=n_layers,
        n_heads=n_heads,
        grids=[(4, 4)] * n,
        seed=seed,
        model=model,
        dataset=dataset,
        coverage=coverage,
    )


# ---------------------------------------------------------------- an experiment's results.json
def fake_entries() -> list[dict]:
    """Setups as `mechhi experiment` records them: original, top-3, random-3 over 3 seeds."""

    def entry(name: str, group: str, mean: float, se: float, seed: int = 0, layers=(0, 1, 2)) -> dict:
        metrics = {
            m: {"mean": mean + i, "se": se} for i, m in enumerate(("vqa_accuracy", "ans_prob", "perplexity"))
        }
        trained = group != "original"
        return {
            "name": name,
            "group": group,
            "spec": group if trained else None,
            "seed": seed,
            "metrics": metrics,
            "layers": list(layers) if trained else [],
            "params": {
                "total": 1000,
                "trainable": 15 if trained else 0,
                "trainable_pct": 1.5 if trained else 0.0,
            },
            "training": {
                "loss_curve": [(0, 2.0), (10, 0.5)],
                "best_step": 10,
                "best_val_loss": 0.6,
                "stopped_early": False,
            },
            "audit": {"lora_B_norm": 2.5, "probe_max_abs_logit_shift": 6.0, "flags": []},
        }

    return [
        entry("original", "original", 0.6, 0.03),
        entry("top-3", "top-3", 0.4, 0.02),
        *(entry(f"random-3 (seed {s})", "random-3", 0.3 + 0.1 * s, 0.01, s, (3 + s, 5, 7)) for s in range(3)),
    ]


def fake_experiment(out: Path) -> dict:
    """A results.json written by the experiment's own writer, from `fake_entries`."""
    from dataclasses import dataclass

    from mechhi.evaluate.tables import build_report, write_tables

    @dataclass
    class Config:
        k: int = 3
        random_seeds: tuple = (0, 1, 2)

    report = build_report(Config(), "/abs/zoo/toy", "/abs/data/toy-finetune", fake_entries())
    write_tables(report, out)
    return report
