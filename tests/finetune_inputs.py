"""What the fine-tuning and experiment tests train and select on: a tiny Qwen2-VL with
the toy's vocabulary, a small synthetic dataset, and a store with a hand-made ranking."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import xarray as xr

from mechhi.data.synthetic import WorldConfig, build_synthetic
from mechhi.models.qwen2_vl import Qwen2VLAdapter
from mechhi.models.tiny import tiny_qwen2_vl
from mechhi.models.toy import vocabulary
from mechhi.store import SampleMeta, create_store, write_scores


def toy_tiny(layers: int = 4):
    """A tiny random Qwen2-VL with the toy's vocabulary (size words included), float32."""
    torch.manual_seed(0)
    model, processor = tiny_qwen2_vl(words=vocabulary(), layers=layers)
    return model.float().eval(), Qwen2VLAdapter(model.config, processor)


def tiny_dataset(root: Path, n_images: int = 16) -> Path:
    """Synthetic scenes at 56 px (4 visual tokens) with size words, train/val/test splits."""
    return build_synthetic(
        root,
        n_images=n_images,
        seed=3,
        splits={"train": 0.5, "val": 0.25, "test": 0.25},
        config=WorldConfig(image_size=56, describe_size=True, max_objects=2),
        progress=False,
    )


def scored_store(
    path: Path, n_layers: int, means: np.ndarray | None = None, *, samples: int = 1, traced: int | None = None
) -> Path:
    """A real on-disk store (create_store + write_scores) with a hand-made head_impact;
    the first ``traced`` samples (default all) flagged done."""
    import zarr

    means = np.linspace(0.1, 0.9, n_layers)[::-1] if means is None else means
    metas = [SampleMeta(f"{i:06d}", "0", "a red circle", {"image": (2, 2)}) for i in range(samples)]
    create_store(
        path,
        samples=metas,
        n_layers=n_layers,
        n_heads=4,
        maps=False,
        attrs={
            "model": "tiny-toy",
            "model_revision": "",
            "dtype": "float32",
            "prompt_template": "caption",
            "dataset": "tiny#0",
        },
    )
    hi = np.repeat(np.asarray(means, dtype=float)[:, None], 4, axis=1)  # (layer, head)
    write_scores(path, xr.Dataset({"head_impact": (("layer", "head"), hi)}))
    done = zarr.open_group(str(path), mode="r+")["done"]
    done[: samples if traced is None else traced] = True
    return path
