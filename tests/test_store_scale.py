"""A store that scales: shards make O(N / shard) files, and scoring reads the attention
cube block by block, so a store larger than memory scores in bounded memory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from mechhi.store import SampleMeta, auto_shard_samples, create_store, open_store, write_batch

ROOT = Path(__file__).resolve().parents[1]
ATTRS = {
    "model": "toy",
    "model_revision": "r",
    "dtype": "float32",
    "prompt_template": "caption",
    "dataset": "d",
}


def synthetic_store(path: Path, n: int, layers: int, heads: int, grid: int, batch: int, **kw) -> None:
    """A store written batch by batch as a trace writes it: random attention and coverage
    on every sample's full grid (seeded by batch), IoU left for the probe."""
    metas = [SampleMeta(f"img{i}", "0", f"thing {i}", {"image": (grid, grid)}) for i in range(n)]
    create_store(path, samples=metas, n_layers=layers, n_heads=heads, attrs=ATTRS, **kw)
    for start in range(0, n, batch):
        idx = list(range(start, min(n, start + batch)))
        rng = np.random.default_rng(start)
        write_batch(
            path,
            idx,
            attention={"image": rng.random((len(idx), layers, heads, grid, grid), dtype=np.float32)},
            mask={"image": rng.random((len(idx), grid, grid), dtype=np.float32)},
        )


def test_a_sharded_store_has_a_few_files_per_variable(tmp_path):
    """The toy model's layout (12 layers, 4 heads, 8x8 grid): 600 samples in 256-sample
    shards make 3 files per variable, where one chunk per sample made 600."""
    store = tmp_path / "s.zarr"
    metas = [SampleMeta(f"i{i}", "0", "d", {"image": (8, 8)}) for i in range(600)]
    shard = auto_shard_samples(metas, 12, 4, True)
    synthetic_store(store, 600, 12, 4, 8, batch=150)
    assert open_store(store).attrs["shard_samples"] == shard == 256
    for name in ("attention", "mask", "iou", "done"):
        chunk_files = [f for _, _, files in os.walk(store / name / "c") for f in files]
        assert len(chunk_files) == math.ceil(600 / shard) == 3, name
    assert sum(len(files) for _, _, files in os.walk(store)) < 40  # + metadata and coordinates
    assert open_store(store)["done"].values.all()


def test_the_small_variables_are_one_chunk_per_shard_and_the_maps_one_per_sample(tmp_path):
    """Every open reads all ``done`` flags and ``stats`` reads all ``iou``: as one inner chunk
    per shard they decode in O(N / shard) chunks, not O(N) (5.4 s an open at 10,000 samples
    with one chunk per sample), while a map is still read one sample at a time."""
    import zarr

    store = tmp_path / "s.zarr"
    synthetic_store(store, 40, 2, 2, 4, batch=10, shard_samples=16)
    group = zarr.open_group(str(store), mode="r")
    inner = {
        name: group[name].metadata.codecs[0].chunk_shape[0] for name in ("done", "iou", "mask", "attention")
    }
    assert inner == {"done": 16, "iou": 16, "mask": 1, "attention": 1}
    assert all(group[name].metadata.chunk_grid.chunk_shape[0] == 16 for name in inner)  # shards of 16
    assert open_store(store)["done"].values.all() and open_store(store)["iou"].chunks[0] == (16, 16, 8)


SCORE_UNDER_TRACEMALLOC = """
import json, sys, tracemalloc
import probes.maps
from probes.head_impact import ensure_scored
probes.maps.BLOCK_BYTES = int(sys.argv[2])
tracemalloc.start()
result = ensure_scored(sys.argv[1])
peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"peak": peak, "iou": result.ds["iou"].isel(sample=slice(0, 5)).values.tolist(),
                  "hi": result.ds["head_impact"].values.tolist()}))
"""


def test_a_store_larger_than_the_memory_used_scores_block_by_block(tmp_path):
    """Scoring a 16 MB attention cube allocates at most a third of it at once (every
    Python and numpy allocation counted by tracemalloc, in a fresh process), and its IoU
    equals a direct numpy computation."""
    store = tmp_path / "big.zarr"
    n, layers, heads, grid = 80, 12, 4, 32  # no larger: tracemalloc triples the scoring time
    synthetic_store(store, n, layers, heads, grid, batch=20)
    cube_bytes = n * layers * heads * grid * grid * 4  # float32, uncompressed: 16 MB
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", SCORE_UNDER_TRACEMALLOC, str(store), str(2**20)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["peak"] < cube_bytes / 3, f"peak {result['peak']} bytes for a {cube_bytes}-byte cube"
    # the reference: binarise by hand (full grids, coverage >= 0.5 present in every sample)
    ds = open_store(store)
    att = ds["attention"].isel(sample=slice(0, 5)).values.reshape(5, layers, heads, -1).astype(np.float64)
    cov = ds["mask"].isel(sample=slice(0, 5)).values.reshape(5, 1, 1, -1)
    above = att > att.mean(-1, keepdims=True)
    inside = cov >= 0.5
    expected = (above & inside).sum(-1) / (above | inside).sum(-1)
    np.testing.assert_allclose(result["iou"], expected, rtol=1e-6)  # the store keeps float32
    np.testing.assert_allclose(result["hi"], ds["iou"].values.mean(0), rtol=1e-6)  # saved in the store


def test_auto_shards_are_powers_of_two_within_the_byte_bound():
    """A 2B-class model (28 layers, 12 heads, 32x32 tokens: 1.4 MB a sample) gets 16-sample
    shards (24 would fit 32 MiB; 16 is the power of two below); a tiny one the 256 cap."""
    from mechhi.store.layout import MAX_SHARD_SAMPLES, SHARD_BYTES

    big = [SampleMeta("i", "0", "d", {"image": (32, 32)})]
    per_sample = 4 * (1024 * (1 + 28 * 12) + 28 * 12)
    assert auto_shard_samples(big, 28, 12, True) == 16 and 16 * per_sample <= SHARD_BYTES < 32 * per_sample
    assert auto_shard_samples(big, 28, 12, False) == MAX_SHARD_SAMPLES  # --no-maps: masks and iou only
    assert auto_shard_samples([SampleMeta("i", "0", "d", {"image": (2, 2)})], 1, 1, True) == MAX_SHARD_SAMPLES
