"""`mechhi bench`: its models, its eager prediction, its processes and its verdicts.

The figures themselves are not tested (they are what the command is for); what is
tested is that they measure what they say: each config's processor makes the visual
tokens the table claims, the floor runs on an unwrapped twin with the same weights,
eager's predicted need counts what eager keeps (against tensor bytes counted while it
runs), a worker process reports every mode it was asked for, and the targets are
judged from the right cells.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from mechhi.bench.configs import CONFIGS, build, config_named
from mechhi.bench.memory import TensorBytes
from mechhi.bench.modes import Harness, eager, eager_extra_bytes, floor, runners, twin
from mechhi.bench.run import Cell, Report
from mechhi.bench.table import targets
from mechhi.bench.worker import run_job
from mechhi.bench.worker_job import Job
from mechhi.commands import app
from mechhi.models.tiny import build_tiny
from mechhi.trace import AttentionTracer

NARROW = [f"{name}-narrow" for name in CONFIGS]


@pytest.mark.parametrize("name", NARROW)
@pytest.mark.parametrize("target", [256, 1024])
def test_processor_makes_the_promised_visual_tokens(name, target):
    built = build(config_named(name), target, layers=2)
    image_tokens = int((built.batch.inputs["input_ids"][0] == built.adapter.image_token_id).sum())
    assert (
        image_tokens
        == built.geometry.visual_tokens
        == sum(len(v.positions) for v in built.batch.layouts[0].views)
    )
    assert abs(image_tokens - target) <= 0.06 * target, "the geometry must land near the asked size"


def test_geometries_at_the_large_sizes():
    tokens = {name: [c.geometry(t).visual_tokens for t in (4096, 8192)] for name, c in CONFIGS.items()}
    assert tokens == {
        "qwen2-vl-2b": [4096, 8192],
        "paligemma2-3b": [4096, 8100],
        "smolvlm": [4131, 8181],
        "smollm2-llava": [4096, 8281],
    }


def test_real_dimensions_reach_the_model():
    config = CONFIGS["paligemma2-3b"]
    with torch.device("meta"):  # the real widths, without allocating them
        model = build_tiny(config.family.family, **config.build_kwargs(256, layers=2))[0]
    text, dims = model.config.get_text_config(), config.text
    assert model.get_output_embeddings().weight.shape == (dims.vocab, dims.hidden)
    assert (
        text.hidden_size,
        text.num_attention_heads,
        text.num_key_value_heads,
        text.head_dim,
        text.intermediate_size,
        text.vocab_size,
        text.attn_logit_softcapping,
    ) == (dims.hidden, dims.heads, dims.kv_heads, dims.head_dim, dims.intermediate, dims.vocab, 50.0)


def test_twin_shares_the_weights_and_is_not_wrapped():
    built = build(config_named("qwen2-vl-2b-narrow"), 64, layers=2)
    plain = twin(built.model)
    calls = runners(built.model, built.adapter, built.batch)  # wraps built.model with nnsight
    pairs = list(zip(built.model.parameters(), plain.parameters()))
    assert pairs and all(a.data_ptr() == b.data_ptr() for a, b in pairs)
    wrapped = [type(m.__dict__.get("forward")).__name__ for m in plain.modules()]
    assert "Controller" not in wrapped, "nnsight's forward leaked into the twin"
    torch.testing.assert_close(floor(plain, built.batch), floor(built.model, built.batch))
    torch.testing.assert_close(calls["capture"](), eager(plain, built.batch), atol=1e-5, rtol=0)
    bigger = build(
        config_named("qwen2-vl-2b-narrow"), 256, layers=2, model=built.model
    )  # same model, new processor
    assert bigger.model is built.model and bigger.geometry.visual_tokens == 256
    torch.testing.assert_close(
        Harness(plain, AttentionTracer(built.model, bigger.adapter)).calls(bigger.batch)["capture"](),
        eager(plain, bigger.batch),
        atol=1e-5,
        rtol=0,
    )


def test_eager_prediction_counts_what_eager_keeps():
    built = build(config_named("qwen2-vl-2b-narrow"), 1024, layers=3)
    plain = twin(built.model)
    floor(plain, built.batch), eager(plain, built.batch)
    with TensorBytes() as floor_bytes:
        floor(plain, built.batch)
    with TensorBytes() as eager_bytes:
        eager(plain, built.batch)
    measured = eager_bytes.peak - floor_bytes.peak
    text = config_named("qwen2-vl-2b-narrow").text
    predicted = eager_extra_bytes(layers=3, batch=1, heads=text.heads, seq=built.seq_len, dtype=torch.float32)
    assert 0.75 * predicted <= measured <= predicted, (measured, predicted)


def test_worker_reports_every_mode_it_was_asked_for(monkeypatch):
    import mechhi.bench.configs as configs

    builds = []
    real = configs._new_model
    monkeypatch.setattr(configs, "_new_model", lambda *a, **k: builds.append(1) or real(*a, **k))
    base = {"config": "smolvlm-narrow", "targets": [64, 1024], "layers": 2, "rounds": 2, "threads": 1}
    timing = run_job(Job("timing", modes=["floor", "capture", "eager"], skip={"eager": [1024]}, **base))
    config = config_named("smolvlm-narrow")
    assert [t["visual_tokens"] for t in timing] == [
        config.geometry(64).visual_tokens,
        config.geometry(1024).visual_tokens,
    ]
    assert len(builds) == 1, "SmolVLM's sizes differ only in the processor: one model serves both"
    assert set(timing[0]["ratio"]) == {"floor", "capture", "eager"} and set(timing[1]["ratio"]) == {
        "floor",
        "capture",
    }
    assert timing[0]["ratio"]["floor"] == 1.0 and all(
        len(t) == 2 and min(t) > 0 for t in timing[1]["times"].values()
    )
    memory = run_job(Job("memory", modes=["capture"], **base))[0]
    assert memory["peak_bytes"]["capture"] >= memory["held_bytes"]["capture"] > 0


def cell(config: str, tokens: int, layers: int, time: float, mem: float, eager_mem: float | None) -> Cell:
    peaks = {"floor": 1000, "capture": int(1000 * mem)}
    if eager_mem is not None:
        peaks["eager"] = int(1000 * eager_mem)
    c = Cell(
        config,
        layers,
        1,
        tokens,
        tokens,
        tokens + 30,
        seconds={"floor": 1.0, "capture": time},
        ratio={"floor": 1.0, "capture": time},
        peak_bytes=peaks,
        eager_predicted_bytes=9000,
    )
    c.eager_skipped = None if eager_mem is not None else "needs ~9 GiB"
    return c


def test_targets_are_judged_from_the_right_cells():
    cells = [
        cell("qwen2-vl-2b", 256, 28, time=1.5, mem=1.5, eager_mem=1.2),  # below 1024 tokens: not judged
        cell("qwen2-vl-2b", 1024, 28, time=1.05, mem=1.02, eager_mem=3.0),
        cell("qwen2-vl-2b", 4096, 28, time=1.08, mem=1.01, eager_mem=None),  # skipped: counts as not fitting
        cell("smolvlm", 4096, 24, time=1.02, mem=1.03, eager_mem=6.0),
        cell(
            "smolvlm", 8192, 2, time=1.2, mem=1.0, eager_mem=1.5
        ),  # shallow: no eager verdict, but time counts
    ]
    overhead = [
        Cell("qwen2-vl-2b", 28, 4, 441, 441, 470, seconds={"floor": 2.0, "capture": 2.1}),  # 2 s a batch
        Cell("qwen2-vl-2b-narrow", 28, 4, 441, 441, 470, seconds={"floor": 0.3, "nnsight": 0.36}),
    ]  # +60 ms
    verdicts = {
        v["target"].split(" ")[1]: v for v in targets(Report("cpu", "float32", "", "", {}, cells, overhead))
    }
    assert verdicts["time"]["status"] == "NOT met" and verdicts["time"]["value"] == 1.2
    assert verdicts["memory"]["status"] == "met" and verdicts["memory"]["value"] == 1.03
    assert verdicts[">="]["status"] == "met" and verdicts[">="]["value"] == 6.0
    assert verdicts["fixed"]["status"] == "met" and verdicts["fixed"]["value"] == pytest.approx(0.03)
    cells[3].peak_bytes["eager"] = 4000  # a full-depth eager that fits at 4x
    verdicts = {
        v["target"].split(" ")[1]: v for v in targets(Report("cpu", "float32", "", "", {}, cells, overhead))
    }
    assert verdicts[">="]["status"] == "NOT met"


def test_unknown_config_is_one_line_and_exit_1():
    result = CliRunner().invoke(app, ["bench", "--configs", "nope"])
    assert result.exit_code == 1
    assert "unknown config 'nope'" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_bench_command_json_parses_and_covers_every_mode():
    command = [
        sys.executable,
        "-m",
        "mechhi",
        "bench",
        "--configs",
        "qwen2-vl-2b-narrow",
        "--tokens",
        "64,256",
        "--layers",
        "2",
        "--rounds",
        "1",
        "--json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    report = json.loads(done.stdout)
    assert [c["visual_tokens"] for c in report["cells"]] == [64, 256]
    for c in report["cells"]:
        assert set(c["peak_bytes"]) == {"floor", "capture", "eager"} and set(c["ratio"]) == {
            "floor",
            "capture",
            "eager",
        }
    assert {c["config"] for c in report["overhead"]} == {"qwen2-vl-2b-narrow"}
    assert {t["status"] for t in report["targets"]} <= {"met", "NOT met", "not measured"}
