"""Data parallelism: `mechhi finetune` under `accelerate launch` with 2 CPU processes (gloo),
each with half the batch, trains the adapter that one process with the whole batch trains.

Small on purpose (it runs in CI): a 2-layer tiny model, 3 optimizer steps of 2 micro-batches.
The two processes see the samples one process sees, in the same steps (the sample order
is a pure function of the step) and the loss is a per-sample mean, so with DDP's
gradient average the only difference left is the order of float additions.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mechhi.finetune import LOG_FILE, SELECTION_FILE, FinetuneConfig, TrainSettings, finetune
from mechhi.models.tiny import tiny_qwen2_vl
from mechhi.models.toy import vocabulary
from tests.finetune_inputs import scored_store, tiny_dataset

STEPS, BATCH, ACCUM = 3, 2, 2
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], processes: int) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).with_name("accelerate")
    launcher = (
        [str(accelerate), "launch"]
        if accelerate.exists()
        else [sys.executable, "-m", "accelerate.commands.launch"]
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        *launcher,
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "mechhi",
        "finetune",
        *args,
    ]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    tiny_qwen2_vl(root / "model", words=vocabulary(), layers=2)
    return {
        "root": root,
        "model": root / "model",
        "data": tiny_dataset(root / "data"),
        "store": scored_store(root / "s.zarr", 2),
    }


def test_two_processes_with_half_the_batch_train_the_same_adapter(world):
    settings = TrainSettings(
        max_steps=STEPS, batch_size=BATCH, grad_accum=ACCUM
    )  # the command's, otherwise default
    one = finetune(
        FinetuneConfig(
            store=str(world["store"]),
            select="full",
            out=str(world["root"] / "one"),
            dataset=str(world["data"]),
            model=str(world["model"]),
            device="cpu",
            train=settings,
        ),
        progress=False,
    )
    two_dir = world["root"] / "two"
    run = _launch(
        [
            "--store",
            str(world["store"]),
            "--select",
            "full",
            "--out",
            str(two_dir),
            "--dataset",
            str(world["data"]),
            "--model",
            str(world["model"]),
            "--device",
            "cpu",
            "--max-steps",
            str(STEPS),
            "--batch-size",
            str(BATCH // 2),
            "--grad-accum",
            str(ACCUM),
            "--json",
        ],
        processes=2,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)  # only the main process prints, and only the result
    assert summary["layers"] == [0, 1]
    meta = json.loads((two_dir / SELECTION_FILE).read_text())
    assert meta["train"]["batch_size"] == BATCH // 2
    a, b = load_file(one.out / "adapter_model.safetensors"), load_file(two_dir / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and len(a) == 2 * 3 * 2  # 2 layers x q/k/v x A/B
    moved = max(float((a[k] - b[k]).abs().max()) for k in a)
    trained = max(float(a[k].abs().max()) for k in a if "lora_B" in k)
    print(f"max |lora_B| {trained:.2e}, max difference 1 vs 2 processes {moved:.2e}")
    assert trained > 1e-4  # lora_B left zero: the comparison below would be empty
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=f"{key}: max diff {moved:.2e}")
    log_one = json.loads((one.out / LOG_FILE).read_text())
    log_two = json.loads((two_dir / LOG_FILE).read_text())
    for x, y in zip(log_one["train"], log_two["train"], strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    assert log_two["val"][0]["loss"] == pytest.approx(log_one["val"][0]["loss"], rel=1e-5)
