"""The trace job end to end: store contents, resume after a kill, and the CLI contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from mechhi.cli import app
from mechhi.data.format import DatasetWriter, ImageRecord, KeyObject
from mechhi.models.qwen2_vl import Qwen2VLAdapter
from mechhi.trace.job import TraceConfig, trace_dataset
from mechhi.store import open_store
from probes.head_impact import BinarizeRule, layer_ranking, score
from tests.conftest import WORDS

SIZES = [(112, 140), (84, 84), (140, 112), (112, 112), (56, 168), (84, 112), (112, 84)]
COLOURS = ["red", "green", "blue", "yellow"]


def write_toy_dataset(root, n_images: int = 7, with_splits: bool = False) -> None:
    """Rectangles of known colour on grey, one or two objects per image."""
    rng = np.random.default_rng(0)
    with DatasetWriter(root) as writer:
        for i in range(n_images):
            height, width = SIZES[i % len(SIZES)]
            image = Image.new("RGB", (width, height), (128, 128, 128))
            draw = ImageDraw.Draw(image)
            objects = []
            for j in range(1 + i % 2):
                x0, y0 = int(rng.integers(0, width - 30)), int(rng.integers(0, height - 30))
                mask = np.zeros((height, width), bool)
                mask[y0 : y0 + 28, x0 : x0 + 28] = True
                colour = COLOURS[(i + j) % 4]
                draw.rectangle([x0, y0, x0 + 27, y0 + 27], fill=colour)
                objects.append(KeyObject.from_mask(str(j), f"a {colour} square", mask))
            split = ("trace" if i < 3 else "test") if with_splits else None
            record = ImageRecord(f"img{i:03d}", "", width, height, None, tuple(objects), split=split)
            writer.add(record, image)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-qwen2vl")
    Qwen2VLAdapter.build_tiny(directory, words=WORDS, layers=3)
    return directory


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    write_toy_dataset(root)
    return root


def config(model_dir, dataset_dir, store, **kw) -> TraceConfig:
    return TraceConfig(model=str(model_dir), dataset=str(dataset_dir), store=str(store),
                       batch_size=3, device="cpu", dtype="float32", **kw)  # fmt: skip


class Killed(Exception):
    pass


def test_killed_trace_resumes_to_the_same_store(tiny_model_dir, dataset_dir, tmp_path):
    whole = trace_dataset(config(tiny_model_dir, dataset_dir, tmp_path / "whole.zarr"), progress=False)

    def kill_after_first(number, indices):
        if number == 1:
            raise Killed

    resumed_path = tmp_path / "resumed.zarr"
    with pytest.raises(Killed):
        trace_dataset(config(tiny_model_dir, dataset_dir, resumed_path), progress=False, on_batch=kill_after_first)
    partial = open_store(resumed_path)
    assert int(partial.done.sum()) == 6  # two batches of 3 flagged before the kill
    assert np.isnan(partial.attention.isel(sample=8).values).all()
    traced_again = []
    trace_dataset(config(tiny_model_dir, dataset_dir, resumed_path), progress=False,
                  on_batch=lambda n, idx: traced_again.extend(idx))  # fmt: skip
    assert traced_again == list(range(6, 10)), "only the samples not flagged done are traced again"
    a, b = open_store(whole).load(), open_store(resumed_path).load()
    for name in ("attention", "mask", "iou", "done"):
        xr.testing.assert_identical(a[name], b[name])


def test_store_holds_grid_aligned_maps(tiny_model_dir, dataset_dir, tmp_path):
    ds = open_store(trace_dataset(config(tiny_model_dir, dataset_dir, tmp_path / "s.zarr"), progress=False))
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
        assert np.nansum(mask) * cell_area == pytest.approx(28 * 28), "coverage must conserve the object's area"
    assert ds.attrs["model"] == str(tiny_model_dir)
    assert ds.attrs["prompt_template"] == "caption"


def test_cli_trace_rank_stats(tiny_model_dir, dataset_dir, tmp_path):
    runner = CliRunner()
    store = tmp_path / "cli.zarr"
    result = runner.invoke(app, ["trace", "--model", str(tiny_model_dir), "--dataset", str(dataset_dir),
                                 "--store", str(store), "--device", "cpu", "--batch-size", "4"])  # fmt: skip
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
    assert {(t["across"], t["on"]) for t in tests} == {("layer", "head_impact"), ("head", "head_impact"),
                                                       ("layer", "iou"), ("head", "iou")}  # fmt: skip
    assert all(0.0 <= t["p_value"] <= 1.0 and t["df"] >= 1 for t in tests)


def test_rank_with_another_rule_scores_in_memory_and_leaves_the_store(tiny_model_dir, dataset_dir, tmp_path):
    store = trace_dataset(config(tiny_model_dir, dataset_dir, tmp_path / "s.zarr"), progress=False)
    runner = CliRunner()
    first = runner.invoke(app, ["rank", "--store", str(store), "--json"])
    assert first.exit_code == 0 and "saving the scores" in first.stderr, first.output
    saved = open_store(store)
    assert saved.attrs["binarize"] == BinarizeRule().to_dict()
    default_hi = saved.head_impact.values.copy()

    other = runner.invoke(app, ["rank", "--store", str(store), "--json", "--mask-threshold", "0.3", "--no-keep-best"])
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
    result = CliRunner().invoke(app, ["trace", "--model", str(tiny_model_dir), "--dataset", str(tmp_path / "nope"),
                                      "--store", str(tmp_path / "x.zarr"), "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 1
    assert "error" in result.output and "Traceback" not in result.output


def test_trace_defaults_to_the_trace_split(tiny_model_dir, tmp_path):
    """Layers are chosen on the trace split only, so evaluation images stay unseen."""
    write_toy_dataset(tmp_path / "data", with_splits=True)
    store = trace_dataset(config(tiny_model_dir, tmp_path / "data", tmp_path / "s.zarr"), progress=False)
    ds = open_store(store)
    assert sorted(set(ds.image_id.values.tolist())) == ["img000", "img001", "img002"]
    assert ds.attrs["split"] == "trace"
    everything = trace_dataset(config(tiny_model_dir, tmp_path / "data", tmp_path / "all.zarr", split="all"),
                               progress=False)  # fmt: skip
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
