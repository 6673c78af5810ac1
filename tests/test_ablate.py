"""`mechhi ablate` on the bundled toy model: every setup's metrics against the plain model
with the same heads edited by forward pre-hooks, the controls' head counts, the cache,
and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mechhi.commands import app
from mechhi.evaluate.metrics import closed_vqa, perplexity
from mechhi.intervene.ablate import AblateConfig, EvalData, run_ablate
from mechhi.scoring.head_sets import depth_bins, per_layer
from tests.conftest import STORE_SAMPLES
from tests.helpers import invoke, one_line_error
from tests.references import hooked

LIMIT = 6  # held-out samples each setup is evaluated on


def config(toy_store, held_out, out, **kw) -> AblateConfig:
    settings = {
        "store": str(toy_store),
        "dataset": str(held_out),
        "n_heads": 4,
        "seeds": (0, 1),
        "limit": LIMIT,
        "mode": "zero",
        "out": str(out),
        "device": "cpu",
        "dtype": "float32",
    }
    return AblateConfig(**{**settings, **kw})


@pytest.fixture(scope="module")
def zero_run(toy_model, toy_store, held_out, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate")
    return out, run_ablate(config(toy_store, held_out, out), progress=False, loaded=toy_model)


def by_hand(model, adapter, data: EvalData, heads, replace) -> dict[str, float]:
    """Perplexity, VQA accuracy and AnsProb of the plain model with ``heads`` edited by pre-hooks."""
    with hooked(model, adapter, {h: replace(h) for h in heads}), torch.no_grad():
        ppl = perplexity(model, adapter, data.images, [s.description for s in data.samples], batch_size=3)
        vqa = closed_vqa(model, adapter, data.items, batch_size=5)
    return {"perplexity": ppl.mean, "vqa_accuracy": vqa["accuracy"].mean, "ans_prob": vqa["ans_prob"].mean}


def test_setups_match_the_plain_model_edited_by_hand(zero_run, toy_model, held_out):
    _, report = zero_run
    model, adapter = toy_model
    data = EvalData(str(held_out), "test", LIMIT, 0, progress=False)
    names = [s["name"] for s in report["setups"]]
    assert names == [
        "unablated",
        "top-4",
        "bottom-4",
        "matched (seed 0)",
        "matched (seed 1)",
        "depth (seed 0)",
        "depth (seed 1)",
    ]
    for setup in (report["setups"][0], report["setups"][1], report["setups"][-1]):
        heads = [tuple(h) for h in setup["heads"]]
        expected = by_hand(model, adapter, data, heads, lambda _h: torch.zeros_like)
        for metric, value in expected.items():
            assert setup["metrics"][metric]["mean"] == pytest.approx(value, rel=1e-5), (setup["name"], metric)
    base, top = report["setups"][0], report["setups"][1]
    for metric in report["metrics"]:
        assert top["change"][metric]["mean"] == pytest.approx(
            top["metrics"][metric]["mean"] - base["metrics"][metric]["mean"]
        )
        assert top["change"][metric]["se"] >= 0
    assert report["n_samples"] == LIMIT and top["metrics"]["perplexity"]["n"] == LIMIT


def test_heads_come_from_the_store_and_controls_keep_the_counts(zero_run, toy_store):
    from mechhi.scoring.head_sets import bottom_heads, top_heads
    from mechhi.store import open_store

    _, report = zero_run
    hi = open_store(toy_store).head_impact
    setups = {s["name"]: s for s in report["setups"]}
    assert [tuple(h) for h in setups["top-4"]["heads"]] == list(top_heads(hi, 4))
    assert [tuple(h) for h in setups["bottom-4"]["heads"]] == list(bottom_heads(hi, 4))
    top_counts = per_layer([tuple(h) for h in setups["top-4"]["heads"]])
    bins = depth_bins(12, 3)
    for setup in report["setups"]:
        if setup["kind"] == "matched":
            assert {int(k): v for k, v in setup["per_layer"].items()} == top_counts
        if setup["kind"] == "depth":
            counts = per_layer([tuple(h) for h in setup["heads"]])
            for group in bins:
                assert sum(counts.get(l, 0) for l in group) == sum(top_counts.get(l, 0) for l in group)


def test_summary_is_the_setups_aggregated(zero_run):
    _, report = zero_run
    rows = {(r["group"], r["metric"]): r for r in report["summary"]}
    matched = [s for s in report["setups"] if s["kind"] == "matched"]
    for metric in report["metrics"]:
        changes = [s["change"][metric]["mean"] for s in matched]
        row = rows[("matched", metric)]
        assert row["change"] == pytest.approx(np.mean(changes))
        assert row["seeds"]["sd"] == pytest.approx(np.std(changes, ddof=1))
        assert row["seeds"]["n_seeds"] == 2
        assert rows[("top", metric)]["change"] == report["setups"][1]["change"][metric]["mean"]
    json.dumps(report, allow_nan=False)  # NaN-free: any JSON reader takes it


def test_rerun_is_cached_and_loads_no_model(zero_run, toy_store, held_out, monkeypatch):
    out, first = zero_run

    def no_load(*_a, **_k):
        raise AssertionError("a cached rerun loaded the model")

    monkeypatch.setattr("mechhi.models.loading.load", no_load)
    again = run_ablate(config(toy_store, held_out, out), progress=False)
    assert all(s["cached"] for s in again["setups"])
    assert [s["metrics"] for s in again["setups"]] == [s["metrics"] for s in first["setups"]]
    assert (out / "ablate.json").is_file()


def test_mean_ablation_replaces_heads_by_their_reference_means(toy_model, toy_store, held_out, tmp_path):
    from mechhi.intervene.reference import head_means
    from mechhi.trace.trace_dataset import TraceConfig, load_samples

    model, adapter = toy_model
    report = run_ablate(
        config(toy_store, held_out, tmp_path, mode="mean", controls=(), limit=6),
        progress=False,
        loaded=toy_model,
    )
    samples = load_samples(TraceConfig(), adapter).samples[:STORE_SAMPLES]  # the store's own samples
    means = head_means(model, adapter, samples)
    top = report["setups"][1]
    data = EvalData(str(held_out), "test", 6, 0, progress=False)

    def vector(h):
        return lambda x: torch.as_tensor(means.sel(layer=h[0], head=h[1]).values).expand_as(x)

    expected = by_hand(model, adapter, data, [tuple(h) for h in top["heads"]], vector)
    assert top["metrics"]["perplexity"]["mean"] == pytest.approx(expected["perplexity"], rel=1e-5)
    assert top["metrics"]["ans_prob"]["mean"] == pytest.approx(expected["ans_prob"], rel=1e-5)


def test_cli_json_and_errors(toy_store, held_out, tmp_path):
    runner = CliRunner()
    base = [
        "ablate",
        "--store",
        str(toy_store),
        "--dataset",
        str(held_out),
        "--limit",
        "4",
        "--n-heads",
        "2",
        "--seeds",
        "1",
        "--controls",
        "matched",
        "--out",
        str(tmp_path),
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, [*base, "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [s["kind"] for s in payload["setups"]] == ["unablated", "top", "bottom", "matched"]
    table = runner.invoke(app, base)  # cached now: the table of the same numbers
    assert (
        table.exit_code == 0
        and "top-2" in table.stdout
        and "matched" in table.stdout
        and "{" not in table.stdout
    )
    for bad, message in (
        (["--probe", "gaze"], "unknown probe 'gaze'"),
        (["--mode", "half"], "--mode 'half'"),
        (["--store", str(tmp_path / "none.zarr")], "no store at"),
    ):
        failed = runner.invoke(app, [*base, *bad])
        assert failed.exit_code == 1 and message in failed.output and "Traceback" not in failed.output, (
            failed.output
        )


def test_every_evaluate_metric_runs_under_an_edit(toy_model, held_out):
    """`mechhi evaluate`'s whole evaluation, captions included, through the edited stand-in."""
    from mechhi.evaluate.evaluate_run import EvalSettings, evaluate_model
    from mechhi.finetune import load_split
    from mechhi.intervene import HeadEdit, HeadEditor

    model, adapter = toy_model
    split = load_split(held_out, "test")
    settings = EvalSettings(limit=4, batch_size=4, generate=2, max_new_tokens=6)
    heads = [(0, 0), (0, 3), (4, 2)]
    with HeadEditor(model, adapter).edited(HeadEdit.scaled(heads, -1.0)) as edited:
        result = evaluate_model(edited, adapter, split, settings=settings)
    with hooked(model, adapter, {h: (lambda x: -x) for h in heads}):
        expected = evaluate_model(model, adapter, split, settings=settings)
    assert result["generations"] == expected["generations"]
    for metric in ("perplexity", "token_accuracy", "vqa_accuracy", "ans_prob"):
        assert result[metric]["mean"] == pytest.approx(expected[metric]["mean"], rel=1e-5), metric
    assert result["perplexity"]["mean"] != pytest.approx(
        evaluate_model(model, adapter, split, settings=settings)["perplexity"]["mean"]
    )


def test_n_heads_out_of_range_is_one_line_and_a_model_of_another_depth_is_refused(
    toy_store, held_out, shallow_model, tmp_path
):
    base = [
        "ablate",
        "--store",
        toy_store,
        "--dataset",
        held_out,
        "--limit",
        "4",
        "--n-heads",
        "2",
        "--seeds",
        "1",
        "--controls",
        "matched",
        "--out",
        tmp_path,
        "--device",
        "cpu",
    ]
    line = one_line_error(invoke([*base, "--n-heads", "0"], exit_code=1))
    assert "'--n-heads'" in line and "greater than or equal to 1" in line, line
    line = one_line_error(invoke([*base, "--model", shallow_model], exit_code=1))
    assert "disagree" in line and "12 layers x 4 heads" in line and "6 x 4" in line, line


def test_ablate_asks_each_sample_what_trace_and_evaluate_ask(held_out):
    """Issue 18 item 3: a sample's options are f(seed, its id, the whole dataset's pool),
    whatever --limit selects and whichever command draws them."""
    from mechhi.data.format import load_dataset
    from mechhi.data.vqa import format_options
    from mechhi.trace.trace_dataset import TraceConfig, prompt_fields

    test = load_dataset(held_out).split("test")
    traced = prompt_fields(TraceConfig(template="vqa"), test.samples[:3], test)  # `trace --limit 3`
    for limit in (3, 10):
        items = EvalData(str(held_out), "test", limit, 0, progress=False).items
        assert [{"options": format_options(it.options)} for it in items[:3]] == traced, limit
        assert all(it.options[it.answer] == s.description for it, s in zip(items, test.samples))
