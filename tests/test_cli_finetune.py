"""`mechhi finetune`, `evaluate` and `experiment` as a user runs them (typer's CliRunner,
stdout and stderr apart): with --json, stdout is one JSON document and nothing else;
an adapter is refused on a base model it was not trained on (unless --force) and on a
model of another shape, with one line saying what does not match."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from mechhi.commands import app
from mechhi.models.tiny import tiny_qwen2_vl
from mechhi.models.toy import vocabulary
from tests.finetune_inputs import scored_store, tiny_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny models on disk (a, and b of the same shape; c of another), a dataset, a store,
    and an adapter trained on a through the command."""
    root = tmp_path_factory.mktemp("cli-ft")
    for name, seed, shape in (("a", 0, {}), ("b", 1, {}), ("c", 0, {"heads": 2})):
        torch.manual_seed(seed)
        tiny_qwen2_vl(root / name, words=vocabulary(), layers=4, **shape)
    w = {"root": root, "data": tiny_dataset(root / "data"), "store": scored_store(root / "s.zarr", 4)}
    w["finetune"] = [
        "finetune",
        "--store",
        str(w["store"]),
        "--select",
        "top-1",
        "--out",
        str(root / "adapter"),
        "--dataset",
        str(w["data"]),
        "--model",
        str(root / "a"),
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--json",
    ]
    w["first"] = runner.invoke(app, w["finetune"])
    return w


def _one_message(stderr: str) -> str:
    """The command's one error message (rich may wrap it to the terminal's width)."""
    assert stderr.count("error:") == 1, stderr
    return " ".join(stderr.split())


def _evaluate(world, model: str, *extra: str):
    return runner.invoke(
        app,
        [
            "evaluate",
            "--adapter",
            str(world["root"] / "adapter"),
            "--model",
            str(world["root"] / model),
            "--dataset",
            str(world["data"]),
            "--limit",
            "4",
            "--device",
            "cpu",
            "--json",
            *extra,
        ],
    )


def test_finetune_json_is_all_of_stdout_and_a_rerun_says_it_is_done(world):
    first = world["first"]
    assert first.exit_code == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["layers"] == [0] and summary["params"]["trainable"] > 0 and not summary["already_finished"]
    again = runner.invoke(app, world["finetune"])
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["already_finished"] and "already holds this finished run" in again.stderr


def test_evaluate_json_is_all_of_stdout(world):
    result = _evaluate(world, "a")
    assert result.exit_code == 0, result.stderr
    got = json.loads(result.stdout)
    assert got["metrics"]["n"] == 4 and got["audit"]["flags"] == [] and "warning" not in got


def test_evaluate_refuses_an_adapter_on_another_base_model_unless_forced(world):
    refused = _evaluate(world, "b")
    assert refused.exit_code == 1 and refused.stdout == ""
    line = _one_message(refused.stderr)
    assert "was trained on" in line and "--force" in line
    forced = _evaluate(world, "b", "--force")
    assert forced.exit_code == 0, forced.stderr
    got = json.loads(forced.stdout)
    assert "trained on" in got["warning"] and got["metrics"]["n"] == 4
    assert "warning" in forced.stderr


def test_an_adapter_of_another_shape_is_refused_with_what_does_not_fit(world):
    result = _evaluate(world, "c", "--force")
    assert result.exit_code == 1 and result.stdout == ""
    line = _one_message(result.stderr)
    assert "does not fit" in line, line
    # k_proj of layer 0 (the first module): hidden 64 -> 2 kv heads x 16 in the adapter, 32 -> 32 in model c
    assert re.search(
        r"layers\.0\.self_attn\.k_proj maps 32 -> 32 features in '[^']*c', 64 -> 32 in the adapter", line
    )
    assert "state_dict" not in line and "size mismatch" not in line


def test_experiment_json_is_all_of_stdout_progress_goes_to_stderr_and_a_rerun_says_it_is_done(world):
    out = world["root"] / "experiment"
    args = [
        "experiment",
        "--store",
        str(world["store"]),
        "--dataset",
        str(world["data"]),
        "--model",
        str(world["root"] / "a"),
        "--k",
        "1",
        "--seeds",
        "1",
        "--max-steps",
        "1",
        "--limit",
        "4",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert list(report["table4"][0]["cells"]) == [
        "original",
        "top-1",
        "bottom-1",
        "random-1",
        "depth-1",
        "full",
    ]
    assert "[1/6] original" in result.stderr and "[5/6] depth-1 (seed 0)" in result.stderr
    assert (out / "results.json").is_file()
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and json.loads(again.stdout)["table4"] == report["table4"]
    assert "nothing was trained again" in again.stderr and "[1/6]" not in again.stderr


def test_finetune_logs_its_steps_while_stderr_is_a_file(world):
    """Under CliRunner stderr is not a terminal (as with `2> log`): a plain line per step here (2 steps)."""
    assert re.search(r"^fine-tuning: 1/2 \(50%\) \d+\.\d s loss \d", world["first"].stderr, re.M), world[
        "first"
    ].stderr
    assert re.search(r"^fine-tuning: 2/2 \(100%\) \d+\.\d s loss \d", world["first"].stderr, re.M)


def test_finetune_prints_a_table_not_a_python_dict(world):
    summary = json.loads(world["first"].stdout)
    table = runner.invoke(
        app, [a for a in world["finetune"] if a != "--json"]
    )  # the finished run: no training
    assert table.exit_code == 0, table.stderr
    assert "{" not in table.stdout and "'total'" not in table.stdout, table.stdout
    row = next(line for line in table.stdout.splitlines() if str(summary["out"])[-20:] in line)
    params = summary["params"]
    for cell in (
        f"{params['total']:,}",
        f"{params['trainable']:,}",
        f"{params['trainable_pct']:.4f}",
        f"{summary['best_val_loss']:.4f}",
    ):
        assert cell in row, (cell, row)
