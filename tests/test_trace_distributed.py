"""`torchrun --nproc-per-node 2 -m mechhi trace` on CPU (gloo): the two ranks' store equals
one process's, and a rank killed mid-trace leaves samples that a rerun picks up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from mechhi.models.tiny import tiny_qwen2_vl
from mechhi.store import damaged_samples, open_store, shard_samples
from mechhi.trace.distributed import Ranks
from mechhi.trace.trace_dataset import TraceConfig, trace_dataset
from tests.conftest import WORDS
from tests.toy_dataset import write_toy_dataset

ROOT = Path(__file__).resolve().parents[1]
TRACED = ("done", "mask", "iou", "attention")


def test_rank_0s_result_and_its_error_reach_every_rank(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, str(ROOT / "tests" / "dist_worker.py"), str(tmp_path / "init"), str(tmp_path)],
        env=env,
        check=True,
        timeout=180,
    )
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert [s["value"] for s in seen] == [{"made_by": 0}, {"made_by": 0}]  # run once, on rank 0
    assert seen[0]["raised"] == ["ValueError", "store s.zarr exists for a different run"]
    assert seen[1]["raised"] == [
        "PeerFailed",
        "rank 1: rank 0 failed: store s.zarr exists for a different run",
    ]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_ranks_share_pending_samples_by_whole_shards(world):
    rng = np.random.default_rng(world)
    pending = np.sort(rng.choice(100, size=37, replace=False))
    shares = [Ranks(rank, world, rank).share(pending, shard=8) for rank in range(world)]
    np.testing.assert_array_equal(np.sort(np.concatenate(shares)), pending)  # every pending sample, once
    owners = [{int(s) // 8 for s in share} for share in shares]
    assert all(not (a & b) for i, a in enumerate(owners) for b in owners[i + 1 :]), "a shard has two writers"
    sizes = [len(o) for o in owners]
    assert max(sizes) - min(sizes) <= 1  # shards with pending samples dealt evenly


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    tiny_qwen2_vl(root / "model", words=WORDS, layers=3)
    write_toy_dataset(root / "data")  # 7 images, 10 samples
    reference = root / "one.zarr"
    trace_here(root, reference)
    return root, open_store(reference).load()


def trace_here(root: Path, store: Path) -> None:
    """The one-process trace, in this process, on one thread as the ranks are."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trace_dataset(
            TraceConfig(
                model=str(root / "model"),
                dataset=str(root / "data"),
                store=str(store),
                device="cpu",
                dtype="float32",
                batch_size=2,
                shard_samples=2,
            ),
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)


def run(launcher: list[str], root: Path, store: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Trace into `store` with shards of 2 samples and batches of 2, so that every batch
    holds the same samples however the shards are dealt to ranks (batch composition, and
    hence padding, is the same), on one thread per process: the numbers must be equal."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [
        "trace",
        "--model",
        str(root / "model"),
        "--dataset",
        str(root / "data"),
        "--store",
        str(store),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--batch-size",
        "2",
        "--shard-samples",
        "2",
    ]
    done = subprocess.run(
        launcher + args, cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def torchrun(script: str = "-m mechhi") -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        *script.split(),
    ]


def assert_same_trace(store: Path, reference: xr.Dataset) -> None:
    got = open_store(store).load()
    for name in TRACED:
        xr.testing.assert_identical(got[name], reference[name])
    assert damaged_samples(store) == []


def test_two_gloo_ranks_make_the_store_one_process_makes(setup):
    root, reference = setup
    store = root / "two.zarr"
    result = run(torchrun(), root, store)
    assert_same_trace(store, reference)
    assert result.stdout.count("store:") == 1, "only rank 0 scores and prints the result"
    assert (
        "2 ranks trace 10 pending samples in 5 shards of up to 2 samples, each rank its own shards"
        in result.stderr
    )
    assert shard_samples(store) == 2 and open_store(store).attrs["shard_samples"] == 2
    assert "head_impact" in open_store(store).data_vars  # rank 0 scored the finished store
    assert not (root / "two.zarr.lock").exists()


@pytest.mark.slow
def test_a_killed_ranks_samples_are_traced_by_the_rerun(setup):
    root, reference = setup
    store = root / "killed.zarr"
    killed = run(torchrun(str(ROOT / "tests" / "torchrun_kill_rank.py")), root, store, check=False)
    assert killed.returncode != 0
    done = open_store(store)["done"].values
    # rank 1 owns shards 1 and 3 (samples 2, 3 and 6, 7): it died after its first batch
    assert done[[2, 3]].all() and not done[[6, 7]].any(), done
    rerun = run(torchrun(), root, store)
    assert f"{int((~done).sum())} pending samples" in rerun.stderr
    assert_same_trace(store, reference)


@pytest.mark.slow
def test_a_store_of_ranks_resumes_in_one_process(setup):
    """Ranks and a single process share the store layout: a half store written by two
    ranks (one died) is finished by a plain trace."""
    root, reference = setup
    store = root / "finish.zarr"
    run(torchrun(str(ROOT / "tests" / "torchrun_kill_rank.py")), root, store, check=False)
    assert not open_store(store)["done"].values.all()
    trace_here(root, store)
    assert_same_trace(store, reference)
