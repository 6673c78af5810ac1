"""The store's two layouts of the small per-sample variables (``done``, ``iou``), timed
interleaved in one process: one inner chunk per sample (stores before this layout) against
one per shard (`mechhi.store.layout.per_sample_chunks`). The maps keep one chunk per sample
in both. Each round writes a fresh store batch by batch as a trace does, then opens it,
reads its ``done`` flags and reads every sample's ``iou``.

    python scripts/store_layout.py --samples 4000 --batch 500 --rounds 2

Prints JSON: seconds per step and layout (median over rounds) and the ratio old / new.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mechhi.store import SampleMeta, create_store, done_mask, layout, open_store, write_batch

ATTRS = {"model": "m", "model_revision": "r", "dtype": "float32", "prompt_template": "p", "dataset": "d"}
LAYOUTS: dict[str, Callable] = {"per sample": lambda var: True, "per shard": layout.per_sample_chunks}


def one_round(samples: int, batch: int, layers: int, heads: int, grid: int) -> dict[str, float]:
    """Seconds of each step on a fresh store in the layout `layout.per_sample_chunks` picks now."""
    root = Path(tempfile.mkdtemp())
    try:
        path = root / "s.zarr"
        metas = [SampleMeta(f"img{i}", "0", f"thing {i}", {"image": (grid, grid)}) for i in range(samples)]
        create_store(path, samples=metas, n_layers=layers, n_heads=heads, attrs=ATTRS)
        opened, rng = open_store(path), np.random.default_rng(0)
        times, start = {}, time.perf_counter()
        for first in range(0, samples, batch):
            idx = list(range(first, min(samples, first + batch)))
            attention = rng.random((len(idx), layers, heads, grid, grid), dtype=np.float32)
            mask = rng.random((len(idx), grid, grid), dtype=np.float32)
            write_batch(path, idx, attention={"image": attention}, mask={"image": mask}, opened=opened)
        times["write"] = time.perf_counter() - start
        for step, read in (
            ("open_store", lambda: open_store(path)),
            ("done_mask", lambda: done_mask(path)),
            ("read iou", lambda: open_store(path)["iou"].values),
        ):
            start = time.perf_counter()
            read()
            times[step] = time.perf_counter() - start
        return times
    finally:
        shutil.rmtree(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--grid", type=int, default=8)
    args = parser.parse_args()
    chosen = layout.per_sample_chunks
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in LAYOUTS}
    try:
        for _ in range(args.rounds):
            for name, rule in LAYOUTS.items():
                layout.per_sample_chunks = rule
                runs[name].append(one_round(args.samples, args.batch, args.layers, args.heads, args.grid))
    finally:
        layout.per_sample_chunks = chosen
    steps = list(runs["per sample"][0])
    median = {
        name: {s: statistics.median(r[s] for r in rounds) for s in steps} for name, rounds in runs.items()
    }
    print(
        json.dumps(
            {
                "samples": args.samples,
                "batch": args.batch,
                "rounds": args.rounds,
                "seconds": median,
                "per sample / per shard": {
                    s: median["per sample"][s] / median["per shard"][s] for s in steps
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
