"""The trace job end to end: store contents, resume after a kill, reruns, one writer at a
time, lost chunks, provenance, and the CLI contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

from mechhi.commands import app
from mechhi.store import open_store
from mechhi.trace.trace_dataset import TraceConfig, trace_dataset
from probes.head_impact import BinarizeRule, layer_ranking, score
from tests.helpers import cli_trace, invoke, invoke_json, one_line_error
from tests.toy_dataset import SIZES, write_toy_dataset


def config(model_dir, dataset_dir, store, **kw) -> TraceConfig:
    return TraceConfig(
        model=str(model_dir),
        dataset=str(dataset_dir),
        store=str(store),
        batch_size=3,
        device="cpu",
        dtype="float32",
        **kw,
    )


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def plain_store(tiny_model_dir, dataset_dir, tmp_path_factory):
    """The module's one plain trace (``config``: the whole dataset, 3 a batch, not scored),
    for the tests that read a finished store; a test that writes takes ``plain_copy``."""
    return trace_dataset(
        config(tiny_model_dir, dataset_dir, tmp_path_factory.mktemp("plain") / "s.zarr"), progress=False
    )


@pytest.fixture
def plain_copy(plain_store, tmp_path):
    """A copy of ``plain_store`` of the test's own."""
    import shutil

    return shutil.copytree(plain_store, tmp_path / "s.zarr")


def test_killed_trace_resumes_to_the_same_store(tiny_model_dir, dataset_dir, plain_store, tmp_path):
    whole = plain_store

    def kill_after_first(number, indices):
        if number == 1:
            raise Killed

    resumed_path = tmp_path / "resumed.zarr"
    with pytest.raises(Killed):
        trace_dataset(
            config(tiny_model_dir, dataset_dir, resumed_path), progress=False, on_batch=kill_after_first
        )
    partial = open_store(resumed_path)
    assert int(partial.done.sum()) == 6  # two batches of 3 flagged before the kill
    assert np.isnan(partial.attention.isel(sample=8).values).all()
    traced_again = []
    trace_dataset(
        config(tiny_model_dir, dataset_dir, resumed_path),
        progress=False,
        on_batch=lambda n, idx: traced_again.extend(idx),
    )
    assert traced_again == list(range(6, 10)), "only the samples not flagged done are traced again"
    a, b = open_store(whole).load(), open_store(resumed_path).load()
    for name in ("attention", "mask", "iou", "done"):
        xr.testing.assert_identical(a[name], b[name])


def test_store_holds_grid_aligned_maps(tiny_model_dir, plain_store):
    ds = open_store(plain_store)
    assert ds.sizes["sample"] == 10 and ds.sizes["layer"] == 3 and ds.sizes["head"] == 4
    assert bool(ds.done.all())
    for i in range(ds.sizes["sample"]):
        rows, cols = int(ds.grid_rows[i]), int(ds.grid_cols[i])
        att = ds.attention.isel(sample=i).values
        assert np.isfinite(att[:, :, :rows, :cols]).all() and np.isnan(att[:, :, rows:, :]).all()
        mask = ds.mask.isel(sample=i).values
        assert np.isnan(mask[rows:, :]).all() and np.isnan(mask[:, cols:]).all()
        height, width = SIZES[int(ds.image_id[i].item()[3:]) % len(SIZES)]
        cell_area = (height / rows) * (width / cols)  # original pixels per token
        assert np.nansum(mask) * cell_area == pytest.approx(28 * 28), (
            "coverage must conserve the object's area"
        )
    assert ds.attrs["model"] == str(tiny_model_dir)
    assert ds.attrs["prompt_template"] == "caption"


def test_cli_trace_rank_stats(tiny_model_dir, dataset_dir, tmp_path):
    runner = CliRunner()
    store = tmp_path / "cli.zarr"
    result = runner.invoke(
        app,
        [
            "trace",
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(dataset_dir),
            "--store",
            str(store),
            "--device",
            "cpu",
            "--batch-size",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    ranked = runner.invoke(app, ["rank", "--store", str(store), "--json"])
    assert ranked.exit_code == 0, ranked.output
    payload = json.loads(ranked.stdout)
    assert sorted(r["layer"] for r in payload["layers"]) == [0, 1, 2]
    hi = open_store(store).head_impact.mean("head")
    assert payload["layers"][0]["layer"] == int(hi.argmax())
    assert payload["layers"][0]["mean_hi"] == pytest.approx(float(hi.max()))
    stats = runner.invoke(app, ["stats", "--store", str(store), "--json"])
    assert stats.exit_code == 0, stats.output
    tests = json.loads(stats.stdout)["kruskal_wallis"]
    assert {(t["across"], t["on"]) for t in tests} == {
        ("layer", "head_impact"),
        ("head", "head_impact"),
        ("layer", "iou"),
        ("head", "iou"),
    }
    assert all(0.0 <= t["p_value"] <= 1.0 and t["df"] >= 1 for t in tests)


def test_rank_with_another_rule_scores_in_memory_and_leaves_the_store(plain_copy):
    store = plain_copy
    runner = CliRunner()
    first = runner.invoke(app, ["rank", "--store", str(store), "--json"])
    assert first.exit_code == 0 and "saving the scores" in first.stderr, first.output
    saved = open_store(store)
    assert saved.attrs["binarize"] == BinarizeRule().to_dict()
    default_hi = saved.head_impact.values.copy()

    other = runner.invoke(
        app, ["rank", "--store", str(store), "--json", "--mask-threshold", "0.3", "--no-keep-best"]
    )
    assert other.exit_code == 0 and "scoring in memory" in other.stderr, other.output
    rule = BinarizeRule(mask_threshold=0.3, keep_best_token=False)
    expected = layer_ranking(score(open_store(store), rule))
    payload = json.loads(other.stdout)
    assert payload["binarize"] == rule.to_dict()
    assert [r["layer"] for r in payload["layers"]] == expected.layer.values.tolist()
    assert [r["mean_hi"] for r in payload["layers"]] == pytest.approx(expected.values.tolist())
    kept = open_store(store)
    assert kept.attrs["binarize"] == BinarizeRule().to_dict()
    np.testing.assert_array_equal(kept.head_impact.values, default_hi)


def test_cli_reports_bad_dataset_in_one_line(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "trace",
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(tmp_path / "nope"),
            "--store",
            str(tmp_path / "x.zarr"),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 1
    assert "error" in result.output and "Traceback" not in result.output


def test_trace_defaults_to_the_trace_split(tiny_model_dir, tmp_path):
    """Layers are chosen on the trace split only, so evaluation images stay unseen."""
    write_toy_dataset(tmp_path / "data", with_splits=True)
    store = trace_dataset(config(tiny_model_dir, tmp_path / "data", tmp_path / "s.zarr"), progress=False)
    ds = open_store(store)
    assert sorted(set(ds.image_id.values.tolist())) == ["img000", "img001", "img002"]
    assert ds.attrs["split"] == "trace"
    everything = trace_dataset(
        config(tiny_model_dir, tmp_path / "data", tmp_path / "all.zarr", split="all"), progress=False
    )
    assert open_store(everything).sizes["sample"] == 10


def test_rank_warns_on_an_unfinished_store(tiny_model_dir, dataset_dir, tmp_path):
    def kill(number, indices):
        raise Killed

    store = tmp_path / "partial.zarr"
    with pytest.raises(Killed):
        trace_dataset(config(tiny_model_dir, dataset_dir, store), progress=False, on_batch=kill)
    result = CliRunner().invoke(app, ["rank", "--store", str(store), "--json"])
    assert result.exit_code == 0, result.output
    assert "only 3 of 10 samples are traced" in result.stderr
    assert json.loads(result.stdout)["samples_done"] == 3


# --------------------------------------------------------------- reruns and partial scores (issue 10, item 1)
def test_rerunning_a_finished_trace_is_a_no_op(tiny_model_dir, dataset_dir, tmp_path):
    store = tmp_path / "s.zarr"
    first = cli_trace(tiny_model_dir, dataset_dir, store)
    before = open_store(store).load()
    again = cli_trace(tiny_model_dir, dataset_dir, store)
    assert "nothing to trace" in again.stderr
    assert again.stdout == first.stdout  # the same result line, and only that, on stdout
    assert len(again.stdout.splitlines()) == 1
    xr.testing.assert_identical(open_store(store).load().drop_attrs(), before.drop_attrs())


def test_rank_on_a_half_traced_store_saves_nothing_and_the_resume_completes(
    tiny_model_dir, dataset_dir, tmp_path
):
    store = tmp_path / "s.zarr"
    with pytest.raises(Killed):
        trace_dataset(config(tiny_model_dir, dataset_dir, store), progress=False, on_batch=kill_at(0))
    partial = invoke_json(["rank", "--store", store])
    assert partial["samples_done"] == 3
    assert "head_impact" not in open_store(store)  # a score of 3 of 10 samples is not kept
    cli_trace(tiny_model_dir, dataset_dir, store)  # the resume is accepted and finishes
    ds = open_store(store)
    assert bool(ds.done.all()) and ds.attrs["scored_samples"] == 10
    expected = score(ds.drop_vars("head_impact"))  # independent of what was stored
    np.testing.assert_allclose(ds.head_impact.values, expected.head_impact.values)
    assert invoke_json(["rank", "--store", store])["layers"][0]["mean_hi"] == pytest.approx(
        float(layer_ranking(expected)[0])
    )


def test_partial_scores_written_by_an_older_run_are_replaced(tiny_model_dir, dataset_dir, tmp_path):
    """A store scored half-traced (by `score_store`, or by a mechhi before this check) resumes,
    and its stale head_impact is rescored on the complete trace."""
    from probes.head_impact import score_store

    store = tmp_path / "s.zarr"
    with pytest.raises(Killed):
        trace_dataset(config(tiny_model_dir, dataset_dir, store), progress=False, on_batch=kill_at(0))
    stale = score_store(store).head_impact.values
    cli_trace(tiny_model_dir, dataset_dir, store)
    ds = open_store(store)
    assert ds.attrs["scored_samples"] == 10
    assert not np.allclose(ds.head_impact.values, stale)
    np.testing.assert_allclose(ds.head_impact.values, score(ds).head_impact.values)


def test_a_store_that_cannot_be_written_is_scored_in_memory(plain_copy, monkeypatch):
    from mechhi.store import WriterLock

    store = plain_copy

    def read_only(self):
        raise PermissionError(13, "Permission denied", str(self.path))

    monkeypatch.setattr(WriterLock, "acquire", read_only)
    result = invoke(["rank", "--store", store, "--json"])
    assert "scoring in memory: the scores cannot be saved" in result.stderr
    assert "head_impact" not in open_store(store)
    assert json.loads(result.stdout)["layers"][0]["mean_hi"] == pytest.approx(
        float(layer_ranking(score(open_store(store)))[0])
    )


def kill_at(batch_number):
    def kill(number, indices):
        if number == batch_number:
            raise Killed

    return kill


# ---------------------------------------------------------------- one writer (item 2)
def test_a_second_writer_is_refused_naming_the_holder(tiny_model_dir, dataset_dir, tmp_path):
    import os
    import socket

    from mechhi.store import WriterLock

    store = tmp_path / "s.zarr"
    with WriterLock(store):  # another trace holds the store
        refused = cli_trace(tiny_model_dir, dataset_dir, store, exit_code=1)
    message = one_line_error(refused)
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in message and "s.zarr.lock" in message
    assert not store.exists()
    cli_trace(tiny_model_dir, dataset_dir, store)  # released: the next run works
    assert bool(open_store(store).done.all()) and not (tmp_path / "s.zarr.lock").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tiny_model_dir, dataset_dir, tmp_path):
    import socket
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / "s.zarr.lock").write_text(f"{gone.pid}\n{socket.gethostname()}\n")
    result = cli_trace(tiny_model_dir, dataset_dir, tmp_path / "s.zarr")
    assert "stale lock" in result.stderr and str(gone.pid) in result.stderr


@pytest.mark.slow  # two real processes each load torch and transformers: about a minute on 2 cores
def test_two_traces_started_together_make_one_store(tiny_model_dir, dataset_dir, tmp_path):
    """Two real processes on one new store: one traces it, the other is refused cleanly
    (or, started after, finds it finished); the store is complete and nothing is left over."""
    import os
    import subprocess
    import sys

    store = tmp_path / "s.zarr"
    command = [
        sys.executable,
        "-m",
        "mechhi",
        "trace",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(dataset_dir),
        "--store",
        str(store),
        "--device",
        "cpu",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    runs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outcomes = [(run.wait(), *run.communicate()) for run in runs]
    assert any(code == 0 for code, _, _ in outcomes), outcomes
    for code, out, err in outcomes:
        assert code in (0, 1) and "Traceback" not in err, err
        if code == 1:
            assert "is being written by pid" in err and not out
    assert bool(open_store(store).done.all())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]  # no lock, no staging copy


# ---------------------------------------------------------------- lost chunks (item 5)
def test_a_deleted_chunk_of_a_done_sample_is_found_and_retraced(tiny_model_dir, dataset_dir, tmp_path):
    store = tmp_path / "s.zarr"
    cli_trace(tiny_model_dir, dataset_dir, store, "--shard-samples", "2")
    original = open_store(store).load()
    (store / "attention" / "c" / "2" / "0" / "0" / "0" / "0").unlink()  # the shard of samples 4 and 5
    refused = one_line_error(invoke(["rank", "--store", store], exit_code=1))
    assert "samples 4, 5" in refused or ": 4, 5 " in refused
    report = invoke_json(["store", "verify", store], exit_code=1)
    assert [(d["sample"], d["variable"]) for d in report["damaged"]] == [(4, "attention"), (5, "attention")]
    again = cli_trace(tiny_model_dir, dataset_dir, store)
    assert "tracing them again" in again.stderr
    retraced = open_store(store).load()
    for name in ("mask", "done"):
        xr.testing.assert_identical(retraced[name], original[name])
    # samples 4 and 5 in a batch of their own now, in padded batches of 3 before: equal to float tolerance
    xr.testing.assert_allclose(retraced["attention"], original["attention"], rtol=1e-4, atol=1e-6)
    assert invoke_json(["store", "verify", store])["damaged"] == []


def test_a_garbage_shard_is_found_by_a_plain_verify_and_repaired_by_the_trace(
    tiny_model_dir, dataset_dir, tmp_path
):
    store = tmp_path / "s.zarr"
    cli_trace(tiny_model_dir, dataset_dir, store, "--shard-samples", "2")
    original = open_store(store).load()
    (store / "mask" / "c" / "3" / "0" / "0").write_bytes(b"not a zstd frame")  # the shard of samples 6 and 7
    report = invoke_json(["store", "verify", store], exit_code=1)  # no shard index: found without decoding
    assert [(d["sample"], d["variable"], d["kind"]) for d in report["damaged"]] == [
        (6, "mask", "damaged"),
        (7, "mask", "damaged"),
    ]
    again = cli_trace(tiny_model_dir, dataset_dir, store)
    assert "tracing them again" in again.stderr
    xr.testing.assert_identical(open_store(store)["mask"].load(), original["mask"])


# ---------------------------------------------------------------- checksummed chunks (issue 18, item 1)
@pytest.fixture(scope="module")
def finished_store(tiny_model_dir, dataset_dir, tmp_path_factory):
    """A finished toy store of 10 samples in shards of 8 (files c/0: samples 0-7, c/1: 8-9)."""
    store = tmp_path_factory.mktemp("finished") / "s.zarr"
    cli_trace(tiny_model_dir, dataset_dir, store, "--shard-samples", "8")
    return store


@pytest.fixture
def finished_copy(finished_store, tmp_path):
    """A copy of ``finished_store`` of its own, for a test that damages it."""
    import shutil

    return shutil.copytree(finished_store, tmp_path / "s.zarr")


def flip_bytes(file, count: int = 4) -> None:
    """Invert `count` bytes in the middle of a file, as a failing disk or copy would."""
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    file.write_bytes(bytes(data))


def visual_mass(store) -> dict[int, float]:
    report = invoke_json(["rank", "--store", store, "--probe", "attention-mass"])
    return {row["layer"]: row["mean_visual_mass"] for row in report["layers"]}


def test_flipped_bytes_in_a_shard_are_found_refused_repaired_and_retraced(
    tiny_model_dir, dataset_dir, finished_copy
):
    store = finished_copy
    before, original = visual_mass(store), open_store(store).load()
    flip_bytes(store / "attention" / "c" / "1" / "0" / "0" / "0" / "0")  # samples 8 and 9
    assert (
        invoke_json(["store", "verify", store])["damaged"] == []
    )  # the shard index is intact: --deep decodes
    deep = invoke_json(["store", "verify", store, "--deep"], exit_code=1)
    assert {(d["variable"], d["file"], d["kind"]) for d in deep["damaged"]} == {
        ("attention", "attention/c/1/0/0/0/0", "unreadable")
    }
    hit = [d["sample"] for d in deep["damaged"]]
    assert hit and set(hit) <= {8, 9} and "checksum do not match" in deep["damaged"][0]["problem"]
    refused = one_line_error(
        invoke(["rank", "--store", store, "--probe", "attention-mass", "--json"], exit_code=1)
    )
    assert (
        "attention/c/1/0/0/0/0" in refused
        and f"lost data: {hit[0]}" in refused
        and "--deep --repair" in refused
    )
    assert invoke_json(["store", "verify", store, "--deep", "--repair"])["repaired"] == [
        8,
        9,
    ]  # the whole file
    assert not (store / "attention" / "c" / "1" / "0" / "0" / "0" / "0").exists()
    assert "nothing to trace" not in cli_trace(tiny_model_dir, dataset_dir, store).stderr
    assert invoke_json(["store", "verify", store, "--deep"])["damaged"] == []
    xr.testing.assert_allclose(
        open_store(store)["attention"].load(), original["attention"], rtol=1e-4, atol=1e-6
    )
    assert visual_mass(store) == pytest.approx(before, rel=1e-4)


def test_a_truncated_shard_is_found_by_a_plain_verify_and_by_rank(tiny_model_dir, dataset_dir, finished_copy):
    store = finished_copy
    original = open_store(store).load()
    shard = store / "attention" / "c" / "0" / "0" / "0" / "0" / "0"  # samples 0-7
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    report = invoke_json(["store", "verify", store], exit_code=1)
    assert [(d["sample"], d["file"], d["kind"]) for d in report["damaged"]] == [
        (s, "attention/c/0/0/0/0/0", "damaged") for s in range(8)
    ]
    for probe in ("head-impact", "attention-mass"):
        refused = one_line_error(invoke(["rank", "--store", store, "--probe", probe], exit_code=1))
        assert "8 done sample(s) have lost data: 0, 1, 2, 3, 4 and 3 more" in refused
        assert "attention shard damaged (attention/c/0/0/0/0/0" in refused
    assert (
        "tracing them again" in cli_trace(tiny_model_dir, dataset_dir, store).stderr
    )  # repaired by the trace
    assert invoke_json(["store", "verify", store, "--deep"])["damaged"] == []
    xr.testing.assert_allclose(
        open_store(store)["attention"].load(), original["attention"], rtol=1e-4, atol=1e-6
    )


def test_a_missing_inner_chunk_of_a_present_shard_is_found(tiny_model_dir, dataset_dir, finished_copy):
    import zarr

    store = finished_copy
    mask = zarr.open_array(str(store / "mask"), mode="r+", config={"write_empty_chunks": False})
    mask[3] = np.nan  # all fill value: zarr drops sample 3's inner chunk from shard c/0
    report = invoke_json(["store", "verify", store], exit_code=1)
    assert [(d["sample"], d["variable"], d["kind"]) for d in report["damaged"]] == [(3, "mask", "missing")]
    assert "missing from its shard (mask/c/0/0/0)" in report["damaged"][0]["problem"]
    assert "tracing them again" in cli_trace(tiny_model_dir, dataset_dir, store).stderr
    assert invoke_json(["store", "verify", store])["damaged"] == []


def test_a_damaged_done_file_is_named_and_repairable(tiny_model_dir, dataset_dir, finished_copy):
    store = finished_copy
    original = open_store(store).load()
    flip_bytes(store / "done" / "c" / "0")  # the flags of samples 0-7
    for command in (["rank", "--store", store], ["stats", "--store", store]):
        refused = one_line_error(invoke(command, exit_code=1))
        assert "the done flags in done/c/0 are damaged" in refused and "store verify --repair" in refused
    report = invoke_json(["store", "verify", store], exit_code=1)
    assert [(d["sample"], d["file"]) for d in report["damaged"]] == [(s, "done/c/0") for s in range(8)]
    assert invoke_json(["store", "verify", store, "--repair"])["repaired"] == list(range(8))
    assert open_store(store).done.values.tolist() == [False] * 8 + [True] * 2
    cli_trace(tiny_model_dir, dataset_dir, store)
    assert invoke_json(["store", "verify", store, "--deep"])["damaged"] == []
    xr.testing.assert_allclose(
        open_store(store)["attention"].load(), original["attention"], rtol=1e-4, atol=1e-6
    )


def test_a_damaged_done_file_is_repaired_by_the_trace_itself(tiny_model_dir, dataset_dir, finished_copy):
    store = finished_copy
    flip_bytes(store / "done" / "c" / "1")
    again = cli_trace(tiny_model_dir, dataset_dir, store)
    assert "done flag unreadable (done/c/1" in again.stderr and "tracing them again" in again.stderr
    assert bool(open_store(store).done.all())


def test_a_deleted_done_file_is_said_and_its_samples_retraced(tiny_model_dir, dataset_dir, finished_copy):
    store = finished_copy
    (store / "done" / "c" / "1").unlink()
    report = invoke_json(["store", "verify", store])  # not lost: the samples are pending, and said so
    assert report["unflagged"] == [{"file": "done/c/1", "samples": [8, 9]}] and report["done"] == 8
    text = invoke(["store", "verify", store]).stdout
    assert "done/c/1 is missing, but samples 8-9 have traced data" in text
    again = cli_trace(tiny_model_dir, dataset_dir, store)
    assert "done/c/1 is missing, but samples 8-9 have traced data" in again.stderr
    assert bool(open_store(store).done.all()) and invoke_json(["store", "verify", store])["unflagged"] == []


def test_a_toy_store_checksums_every_chunk(finished_copy):
    import zarr

    from mechhi.store import unchecked
    from mechhi.store.layout import checksummed

    group = zarr.open_group(str(finished_copy), mode="r")
    assert unchecked(finished_copy) == []
    assert all(checksummed(group[name]) for name in group.array_keys())  # scores and coords too


# ---------------------------------------------------------------- stdout is the result (item 6)
def test_trace_prints_only_its_result_on_stdout(tiny_model_dir, dataset_dir, tmp_path):
    result = cli_trace(tiny_model_dir, dataset_dir, tmp_path / "s.zarr")
    assert result.stdout.splitlines() == [
        line for line in result.stdout.splitlines() if line.startswith("store: ")
    ]
    assert len(result.stdout.splitlines()) == 1
    assert "tracing" in result.stderr  # the progress bar went to stderr


def test_every_score_command_prints_json_only(tiny_model_dir, dataset_dir, plain_copy):
    store = plain_copy
    assert invoke_json(["rank", "--store", store])["probe"] == "head-impact"
    assert invoke_json(["rank", "--store", store, "--probe", "attention-mass"])["layers"]
    assert (
        invoke_json(["rank", "--store", store, "--mask-threshold", "0.3"])["binarize"]["mask_threshold"]
        == 0.3
    )
    assert len(invoke_json(["stats", "--store", store])["kruskal_wallis"]) == 4
    assert invoke_json(["store", "verify", store])["done"] == 10
    pursuit = invoke_json(
        [
            "pursuit",
            "--model",
            tiny_model_dir,
            "--dataset",
            dataset_dir,
            "--device",
            "cpu",
            "--words",
            "red,green,blue",
            "--k",
            "2",
            "--top",
            "3",
        ]
    )
    assert len(pursuit["heads"]) == 3


# ---------------------------------------------------------------- templates and devices (item 7)
def test_trace_with_the_vqa_template_draws_options_as_evaluation_does(tiny_model_dir, dataset_dir, tmp_path):
    from mechhi.data.synthetic import build_synthetic
    from mechhi.data.vqa import format_options, option_pool, vqa_items
    from mechhi.models.loading import load
    from mechhi.trace.attention import AttentionTracer

    data = build_synthetic(
        tmp_path / "data", n_images=4, seed=0, progress=False
    )  # enough distinct descriptions
    store = tmp_path / "vqa.zarr"
    cli_trace(tiny_model_dir, data, store, "--template", "vqa", "--split", "all")
    ds = open_store(store)
    assert ds.attrs["prompt_template"] == "vqa" and "Choose one of the options" in ds.attrs["prompt"]
    # independent reference: evaluation's own option draw, traced by hand for sample 0
    model, adapter = load(str(tiny_model_dir), device="cpu", dtype="float32")
    from mechhi.data.format import load_dataset

    dataset = load_dataset(data)
    samples = dataset.samples
    options = format_options(
        vqa_items(samples, [None] * len(samples), seed=0, pool=option_pool(dataset))[0].options
    )
    batch = adapter.prepare(
        [samples[0].image()], [samples[0].description], template="vqa", fields=[{"options": options}]
    )
    cube = AttentionTracer(model, adapter).trace(batch)[0]  # (L, H, V)
    rows, cols = int(ds.grid_rows[0]), int(ds.grid_cols[0])
    stored = ds.attention.isel(sample=0).values[:, :, :rows, :cols].reshape(cube.shape[0], cube.shape[1], -1)
    np.testing.assert_allclose(stored, cube[..., : rows * cols], rtol=1e-5, atol=1e-7)


def test_a_samples_vqa_prompt_does_not_depend_on_the_limit(tiny_model_dir, tmp_path):
    """Options are f(seed, sample id, the whole dataset's descriptions): the first 4 samples
    are asked the same under --limit 4, --limit 20 and no limit (their attention is the
    same), and a resumed trace with another --limit asks the same too."""
    from mechhi.data.format import load_dataset
    from mechhi.data.synthetic import build_synthetic
    from mechhi.trace.trace_dataset import load_samples, prompt_fields

    data = build_synthetic(tmp_path / "data", n_images=9, seed=0, progress=False)
    assert len(load_dataset(data)) > 20
    stores = {}
    for limit in (4, 20, None):
        store = stores[limit] = tmp_path / f"limit-{limit}.zarr"
        cli_trace(
            tiny_model_dir,
            data,
            store,
            "--template",
            "vqa",
            "--split",
            "all",
            *(("--limit", str(limit)) if limit else ()),
        )
    first = {
        limit: open_store(store).attention.isel(sample=slice(0, 4)).values for limit, store in stores.items()
    }
    np.testing.assert_allclose(first[4], first[None], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(first[20], first[None], rtol=1e-5, atol=1e-7)
    twenty = open_store(stores[20]).attention.values
    np.testing.assert_allclose(
        twenty, open_store(stores[None]).attention.isel(sample=slice(0, 20)).values, rtol=1e-5, atol=1e-7
    )
    # the prompt text itself: each sample's options under any limit and in any order
    _, adapter = load_tiny_adapter(tiny_model_dir)
    whole = TraceConfig(dataset=str(data), template="vqa", split="all")
    dataset = load_samples(whole, adapter)
    everything = prompt_fields(whole, dataset.samples, dataset)
    assert prompt_fields(whole, dataset.samples[:4], dataset) == everything[:4]
    assert prompt_fields(whole, dataset.samples[::-1], dataset) == everything[::-1]
    assert len({f["options"] for f in everything}) == len(everything)


def load_tiny_adapter(model_dir):
    from mechhi.models.loading import load

    return load(str(model_dir), device="cpu", dtype="float32")


@pytest.mark.parametrize(
    "option, value, fragment",
    [
        ("--template", "nonsense", "choose caption or vqa"),
        ("--device", "nonsense", "choose auto, cpu, cuda"),
    ],
)
def test_a_wrong_choice_lists_the_choices(tiny_model_dir, dataset_dir, tmp_path, option, value, fragment):
    message = one_line_error(
        cli_trace(tiny_model_dir, dataset_dir, tmp_path / "s.zarr", option, value, exit_code=1)
    )
    assert fragment in message and repr(value) in message
    assert "RuntimeError" not in message and "MECHHI_DEBUG" not in message


# ---------------------------------------------------------------- default store names (item 8)
def test_default_stores_are_named_by_model_and_dataset():
    from mechhi.bundled import BUNDLED_DATASET, BUNDLED_MODEL

    demo = TraceConfig().store_path()
    assert demo == TraceConfig(model=str(BUNDLED_MODEL), dataset=str(BUNDLED_DATASET)).store_path()
    mine = TraceConfig(dataset="data/toy").store_path()
    other_model = TraceConfig(model="Qwen/Qwen2-VL-2B-Instruct", dataset="data/toy").store_path()
    assert len({demo, mine, other_model}) == 3
    assert other_model.name == "Qwen2-VL-2B-Instruct__toy.zarr" and mine.name == "toy-qwen2vl__toy.zarr"
    assert TraceConfig(template="vqa").store_path() == demo.with_name(
        "toy__vqa.zarr"
    )  # one store per template


# ---------------------------------------------------------------- provenance (item 10)
def test_the_store_records_where_its_numbers_come_from(tiny_model_dir, dataset_dir, plain_store, tmp_path):
    import hashlib
    from importlib.metadata import version

    from mechhi.models.loading import load

    ds = open_store(plain_store)
    assert ds.attrs["model"] == str(tiny_model_dir)  # as given, not resolved
    assert ds.attrs["model_revision"].startswith("sha256:")
    assert ds.attrs["versions"] == {
        name: version(name) for name in ("mechhi", "torch", "transformers", "nnsight")
    }
    model, adapter = load(str(tiny_model_dir), device="cpu", dtype="float32")
    assert ds.attrs["attn_implementation"] == model.config._attn_implementation == "sdpa"
    assert ds.attrs["prompt"].endswith("This is a photo of {description}.<|im_end|>\n")
    assert "PromptTemplate" not in ds.attrs["prompt"]
    # the revision follows the weights' content: a changed byte gives another hash
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in tiny_model_dir.iterdir():
        copy.joinpath(f.name).write_bytes(f.read_bytes())
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    other = open_store(trace_dataset(config(copy, dataset_dir, tmp_path / "t.zarr"), progress=False))
    assert other.attrs["model_revision"] != ds.attrs["model_revision"]
    assert hashlib.sha256(bytes(data)).hexdigest() != hashlib.sha256(weights.read_bytes() + b"x").hexdigest()


def test_a_store_knows_its_dataset_by_content_from_any_path_and_directory(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Issue 18 item 9: the dataset is recorded by its resolved path and fingerprint; the
    same content named by another path resumes the store, another content is refused, and
    the store's samples are found from any working directory (old relative records too)."""
    import shutil

    import zarr

    from mechhi.scoring.probe_scores import store_samples, store_source

    project = tmp_path / "project"
    write_toy_dataset(project / "ds", n_images=3)
    (project / "stores").mkdir()
    monkeypatch.chdir(project)
    store = project / "stores" / "s.zarr"
    cli_trace(tiny_model_dir, "ds", store)
    recorded = open_store(store).attrs["dataset"]
    path, _, fingerprint = recorded.rpartition("#")
    assert path == str((project / "ds").resolve()) and len(fingerprint) == 16
    again = cli_trace(tiny_model_dir, project / "ds", store)  # the same content by its absolute path
    assert "nothing to trace" in again.stderr
    shutil.copytree(project / "ds", project / "copy")
    assert (
        "nothing to trace" in cli_trace(tiny_model_dir, project / "copy", store).stderr
    )  # a copy: same content
    other = tmp_path / "other"
    write_toy_dataset(other, n_images=4)
    refused = one_line_error(cli_trace(tiny_model_dir, other, store, exit_code=1))
    assert "different run" in refused and "dataset" in refused
    _, adapter = load_tiny_adapter(tiny_model_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert store_source(open_store(store))[0] == path
    assert [s.image_id for s in store_samples(open_store(store), adapter)] == open_store(
        store
    ).image_id.values.tolist()
    # a store of an earlier version recorded the path as given: found beside the store, by its fingerprint
    zarr.open_group(store, mode="r+").attrs["dataset"] = f"ds#{fingerprint}"
    assert Path(store_source(open_store(store))[0]) == project / "ds"
    assert len(store_samples(open_store(store), adapter)) == open_store(store).sizes["sample"]
    zarr.open_group(store, mode="r+").attrs["dataset"] = "ds#0000000000000000"  # none with that content
    with pytest.raises(ValueError, match="changed since it was traced"):
        store_source(open_store(store))
    zarr.open_group(store, mode="r+").attrs["dataset"] = f"gone#{fingerprint}"
    with pytest.raises(ValueError, match="gone is not on this machine"):
        store_source(open_store(store))


def test_the_bundled_model_is_recorded_by_its_name_and_a_hub_model_by_its_commit(monkeypatch):
    from mechhi.bundled import BUNDLED_MODEL
    from mechhi.models.loading import provenance

    class Config:
        _attn_implementation = "eager"

    class Model:
        config = Config()

    assert provenance(str(BUNDLED_MODEL), Model())["model"] == "mechhi/zoo/toy-qwen2vl"
    Config._commit_hash = "a" * 40
    hub = provenance("Qwen/Qwen2-VL-2B-Instruct", Model())
    assert hub == {
        **hub,
        "model": "Qwen/Qwen2-VL-2B-Instruct",
        "model_revision": "a" * 40,
        "attn_implementation": "eager",
    }


# ---------------------------------------------------------------- long descriptions and memory (item 11)
def test_descriptions_over_the_token_limit_are_bad_records(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    write_toy_dataset(data, n_images=3)
    lines = (data / "annotations.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    record["objects"][0]["description"] = " ".join(["red"] * 300)
    lines[1] = json.dumps(record)
    (data / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    message = one_line_error(cli_trace(tiny_model_dir, data, tmp_path / "a.zarr", exit_code=1))
    assert "line 2" in message and "img001" in message and "300 tokens" in message and "128" in message
    cli_trace(tiny_model_dir, data, tmp_path / "b.zarr", "--skip-bad")
    assert open_store(tmp_path / "b.zarr").sizes["sample"] == 3  # 4 objects, the long one skipped
    cli_trace(tiny_model_dir, data, tmp_path / "c.zarr", "--max-description-tokens", "400")
    assert open_store(tmp_path / "c.zarr").sizes["sample"] == 4


def test_out_of_memory_names_the_batch_and_suggests_a_smaller_batch(
    tiny_model_dir, dataset_dir, tmp_path, monkeypatch
):
    import torch

    from mechhi.trace.attention import AttentionTracer

    calls = []

    def fail_second(self, batch):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.40 GiB")
        return original(self, batch)

    original = AttentionTracer.trace
    monkeypatch.setattr(AttentionTracer, "trace", fail_second)
    message = one_line_error(cli_trace(tiny_model_dir, dataset_dir, tmp_path / "s.zarr", exit_code=1))
    assert "out of memory in batch 2" in message and "samples 3-5" in message and "--batch-size" in message
    assert int(open_store(tmp_path / "s.zarr").done.sum()) == 3  # the first batch is kept


# ---------------------------------------------------------------- small things (item 12)
def test_rank_under_another_rule_leaks_no_library_warning(plain_copy):
    import warnings

    store = plain_copy
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = invoke(["rank", "--store", store, "--mask-threshold", "0.3"])
    assert [
        str(w.message)
        for w in caught
        if issubclass(w.category, (FutureWarning, DeprecationWarning))
        and "xarray" in w.filename + str(w.message)
    ] == []
    assert "Warning" not in result.stderr


def test_a_store_without_done_gives_one_line(plain_copy):
    import shutil

    store = plain_copy
    shutil.rmtree(store / "done")
    message = one_line_error(invoke(["rank", "--store", store], exit_code=1))
    assert "has no 'done' variable" in message and "AttributeError" not in message
