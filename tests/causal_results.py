"""`mechhi ablate` and `mechhi edit` results written by their own writers (`run_ablate`,
`run_edit`) on a small figure store, with the model's part (measuring, captioning, SOMP)
replaced by known per-sample values: the JSON is the real schema, and a test can compute
every number it should hold from `ablate_values` / `edit_captions` by hand.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

N_SAMPLES = 10
SEEDS = (0, 1, 2)
COLOURS = ("red", "green", "blue")
SHAPES = ("circle", "square")


def _rng(heads) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr([list(h) for h in heads]).encode()))


def ablate_values(heads) -> dict[str, list[float]]:
    """Per-sample NLL, VQA correctness, AnsProb of a setup: a fixed draw per head set (more heads, worse)."""
    rng = _rng(heads)
    hurt = 0.1 * len(heads)
    return {
        "nll": (0.4 + hurt + rng.random(N_SAMPLES)).tolist(),
        "vqa_correct": (rng.random(N_SAMPLES) > 0.2 + hurt).astype(float).tolist(),
        "ans_prob": np.clip(rng.random(N_SAMPLES) - hurt, 0, 1).tolist(),
    }


def ablate_result(store: Path, out: Path) -> dict:
    """``run_ablate`` on ``store`` (Head Impact scores, zero ablation of 2 heads, 3 seeds)."""
    from mechhi.intervene import ablate

    class Data:
        directory, samples = Path("/held-out"), list(range(N_SAMPLES))

        def __init__(self, *_args, **_kw) -> None:
            pass

        def fields(self) -> dict:
            return {"data": "fp", "split": "test", "n": N_SAMPLES, "vqa_seed": 0}

    def values(_session, _config, _data, _cache, setup):
        return ablate_values(setup.heads), False

    config = ablate.AblateConfig(
        store=str(store), n_heads=2, mode="zero", seeds=SEEDS, out=str(out), device="cpu", dtype="float32"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ablate, "EvalData", Data)
        patch.setattr(ablate, "_setup_values", values)
        return ablate.run_ablate(config, progress=False)


@dataclass(frozen=True)
class _Object:
    description: str


@dataclass(frozen=True)
class _Record:
    caption: str
    objects: tuple[_Object, ...]


@dataclass(frozen=True)
class _Sample:
    image_id: str
    record: _Record


def edit_samples(n: int = 6) -> list[_Sample]:
    """Images showing "a <colour> <shape>"."""
    return [
        _Sample(f"img{i}", _Record("", (_Object(f"a {COLOURS[i % 3]} {SHAPES[i % 2]}"),))) for i in range(n)
    ]


def edit_captions(heads, samples: list[_Sample]) -> list[str]:
    """Unedited: the true description; edited: a colour word dropped or swapped per a fixed draw."""
    if not heads:
        return [s.record.objects[0].description for s in samples]
    rng = _rng(heads)
    out = []
    for s in samples:
        _, colour, shape = s.record.objects[0].description.split()
        pick = rng.integers(3)
        out.append(
            [f"a {shape}", f"a {colour} {shape}", f"a {COLOURS[(COLOURS.index(colour) + 1) % 3]} {shape}"][
                pick
            ]
        )
    return out


def edit_result(store: Path, out: Path) -> dict:
    """``run_edit`` on ``store``: colour words edited (k=2, alpha -1, 3 seeds), shapes the control."""
    from mechhi.intervene import edit

    samples = edit_samples()

    def scores(session, _config, _cache):
        ds = session.ds
        values = np.arange(ds.sizes["layer"] * ds.sizes["head"], dtype=float).reshape(ds.sizes["layer"], -1)
        return xr.DataArray(
            values, dims=("layer", "head"), coords={"layer": ds["layer"].values, "head": ds["head"].values}
        )

    def captions(_session, _config, picked, _fingerprint, heads, _cache):
        return edit_captions(heads, picked), False

    class Split:
        fingerprint = "fp"

    config = edit.EditConfig(
        store=str(store),
        words=COLOURS,
        control_words=SHAPES,
        k=2,
        seeds=SEEDS,
        out=str(out),
        device="cpu",
        dtype="float32",
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(edit, "pursuit_scores", scores)
        patch.setattr(edit, "_captions", captions)
        patch.setattr(edit, "caption_samples", lambda *_a: (Path("/held-out"), Split(), samples))
        return edit.run_edit(config, progress=False)
