"""Shared fixtures: tiny random-weight models of every supported family, and a small
multi-view store for the probes.

Each family adapter lists ``tiny_cases`` (name -> `build_tiny` keyword arguments); the
tests are parametrised over all of them, so a new family is tested by adding its file.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from mechhi.models import FAMILIES, adapter_for
from mechhi.store import SampleMeta, create_store, pad_grid, write_batch

# One thread: tiny models gain nothing from two, and OpenMP's spinning threads slow a
# busy 2-core machine down many times over.
torch.set_num_threads(1)

WORDS = "red green blue yellow circle square triangle star small large".split()

CASES = [(f.family, case) for f in FAMILIES for case in f.tiny_cases]


@functools.lru_cache(maxsize=None)
def tiny(family: str, case: str):
    """(model, adapter) for one tiny case, float32, eval mode, built once per session."""
    cls = next(f for f in FAMILIES if f.family == family)
    torch.manual_seed(0)
    model, processor = cls.build_tiny(words=WORDS, **cls.tiny_cases[case])
    model = model.float().eval()
    return model, adapter_for(model.config, processor)


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(params=CASES, ids=[f"{f}-{c}" for f, c in CASES])
def tiny_case(request):
    family, case = request.param
    return tiny(family, case)


# ---------------------------------------------------------------- a small multi-view store
# Five samples of different own grids in two views (a tile mosaic "image" and a "global"
# view), padded to MAX; probes are checked on it against plain loops.
L, H = 3, 2
GRIDS = [
    {"image": (2, 3), "global": (1, 2)},
    {"image": (3, 3), "global": (2, 2)},
    {"image": (1, 2), "global": (2, 1)},
    {"image": (3, 1), "global": (1, 1)},
    {"image": (2, 2), "global": (2, 2)},
]
MAX = {"image": (3, 3), "global": (2, 2)}


def multiview_maps(seed: int) -> tuple[dict, dict]:
    """Per sample and view, own-grid attention (L, H, r, c) and coverage (r, c)."""
    rng = np.random.default_rng(seed)
    att = {(s, v): rng.random((L, H) + g) for s, grids in enumerate(GRIDS) for v, g in grids.items()}
    cov = {(s, v): rng.choice([0.0, 0.1, 0.3, 0.5, 0.9], size=g) for s, grids in enumerate(GRIDS) for v, g in grids.items()}
    cov[(3, "image")][:] = 0.2  # a small object: keep-best claims every tied token
    cov[(3, "global")][:] = 0.1
    return att, cov


@pytest.fixture
def multiview_store(tmp_path: Path) -> tuple[Path, dict, dict]:
    att, cov = multiview_maps(seed=3)
    path = tmp_path / "t.zarr"
    samples = [SampleMeta(f"i{s}", f"o{s}", f"d{s}", g) for s, g in enumerate(GRIDS)]
    attrs = {"model": "m", "model_revision": "r", "dtype": "float32", "prompt_template": "p", "dataset": "d"}
    create_store(path, samples=samples, n_layers=L, n_heads=H, attrs=attrs)
    for batch in ([0, 1], [4, 3], [2]):
        write_batch(
            path,
            batch,
            attention={v: np.stack([pad_grid(att[(s, v)], *MAX[v]) for s in batch]) for v in MAX},
            mask={v: np.stack([pad_grid(cov[(s, v)], *MAX[v]) for s in batch]) for v in MAX},
        )
    # Sample 2 as after a kill between its data write and its done flag: data there, not done.
    zarr.open_array(str(path / "done"), mode="r+")[2] = False
    return path, att, cov
