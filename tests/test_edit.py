"""`mechhi edit` on the bundled toy model: the heads SOMP ranks, the captions generated under
the edit (against the plain model with forward pre-hooks), the word counts, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from mechhi.commands import app
from mechhi.data.synthetic import COLOURS
from mechhi.evaluate.generate import generate_captions
from mechhi.intervene.edit import EditConfig, caption_samples, count_words, run_edit
from tests.conftest import STORE_SAMPLES
from tests.helpers import invoke, one_line_error
from tests.references import hooked

SHAPES = ("circle", "square", "triangle", "star")


@pytest.fixture(scope="module")
def edit_run(toy_model, toy_store, held_out, tmp_path_factory):
    config = EditConfig(
        store=str(toy_store),
        dataset=str(held_out),
        k=2,
        alpha=5.0,
        seeds=(0, 1),
        images=4,
        max_new_tokens=8,
        out=str(tmp_path_factory.mktemp("edit")),
        device="cpu",
        dtype="float32",
    )
    return config, run_edit(config, progress=False, loaded=toy_model)


def test_heads_are_somps_top_k_on_the_stores_samples(edit_run, toy_model):
    from mechhi.scoring.pursuit import PursuitConfig, run_pursuit
    from probes.head_pursuit import head_ranking

    _, report = edit_run
    pursuit = run_pursuit(
        PursuitConfig(limit=STORE_SAMPLES, k=3, words=tuple(COLOURS), device="cpu", dtype="float32"),
        progress=False,
        loaded=toy_model,
    )
    ranked = head_ranking(pursuit)
    expected = [(int(ranked["layer"][i]), int(ranked["head"][i])) for i in range(4)]
    assert [(r["layer"], r["head"]) for r in report["ranking"]] == expected
    assert report["ranking"][0]["explained"] == pytest.approx(float(ranked.values[0]))
    assert sorted(tuple(h) for h in report["setups"][1]["heads"]) == sorted(expected[:2])


def test_captions_are_the_plain_models_with_the_heads_scaled_by_hand(edit_run, toy_model, held_out):
    _, report = edit_run
    model, adapter = toy_model
    _, _, samples = caption_samples(str(held_out), "test", 4, progress=False)
    assert len({s.image_id for s in samples}) == 4
    for setup in (report["setups"][0], report["setups"][1], report["setups"][2]):
        heads = [tuple(h) for h in setup["heads"]]
        with hooked(model, adapter, {h: (lambda x: 5.0 * x) for h in heads}):
            expected = generate_captions(model, adapter, samples, max_new_tokens=8)
        assert [c["generated"] for c in setup["captions"]] == [e["generated"] for e in expected], setup[
            "name"
        ]
    assert report["setups"][1]["captions"] != report["setups"][0]["captions"], (
        "degenerate: the edit changed nothing"
    )


def test_word_counts_by_hand(edit_run, held_out):
    _, report = edit_run
    _, _, samples = caption_samples(str(held_out), "test", 4, progress=False)
    for setup in report["setups"]:
        captions = [c["generated"] for c in setup["captions"]]
        words = [c.replace(".", " ").split() for c in captions]
        colours = [sum(w in COLOURS for w in ws) for ws in words]
        shown = [{o.attributes["colour"] for o in s.record.objects} for s in samples]
        right = [sum(w in present for w in ws) for ws, present in zip(words, shown)]
        assert setup["metrics"]["concept"]["mean"] == pytest.approx(np.mean(colours))
        assert setup["metrics"]["concept_correct"]["mean"] == pytest.approx(np.mean(right))
        assert setup["metrics"]["control"]["mean"] == pytest.approx(
            np.mean([sum(w in SHAPES for w in ws) for ws in words])
        )
        assert setup["metrics"]["concept_precision"]["mean"] == pytest.approx(sum(right) / sum(colours))
    top, base = report["setups"][1], report["setups"][0]
    assert top["change"]["concept_precision"]["mean"] == pytest.approx(
        top["metrics"]["concept_precision"]["mean"] - base["metrics"]["concept_precision"]["mean"]
    )
    assert top["ratio"]["concept"]["mean"] == pytest.approx(
        top["metrics"]["concept"]["mean"] / base["metrics"]["concept"]["mean"]
    )
    json.dumps(report, allow_nan=False)


def test_count_words():
    assert count_words("A red circle and a Red star.", ("red", "blue")) == 2
    assert (
        count_words(
            "a red circle and a blue star", ("red", "blue"), present="an orange star and a blue circle"
        )
        == 1
    )
    assert count_words("reddish", ("red",)) == 0


def test_config_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="--concept 'texture'"):
        EditConfig(concept="texture")
    with pytest.raises(ValueError, match="both the concept and the control: \\['red'\\]"):
        EditConfig(words=("red", "blue"), control_words=("red", "circle"))
    assert EditConfig(concept="shape").control == tuple(COLOURS)
    with pytest.raises(ValueError, match="--words needs --control-words"):
        EditConfig(words=("red", "blue"))
    assert EditConfig(words=("red", "blue"), control_words=("circle", "star")).control == ("circle", "star")
    for alpha in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="not a finite number"):
            EditConfig(alpha=alpha)


def test_cli_json_table_and_errors(toy_store, held_out, tmp_path):
    runner = CliRunner()
    base = [
        "edit",
        "--store",
        str(toy_store),
        "--dataset",
        str(held_out),
        "--k",
        "1",
        "--seeds",
        "1",
        "--images",
        "2",
        "--max-new-tokens",
        "4",
        "--out",
        str(tmp_path),
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, [*base, "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [s["kind"] for s in payload["setups"]] == ["unedited", "top", "matched"] and payload[
        "alpha"
    ] == -1.0
    table = runner.invoke(app, base)
    assert table.exit_code == 0 and "top-1" in table.stdout and "First captions" in table.stdout
    failed = runner.invoke(app, [*base, "--concept", "texture"])
    assert (
        failed.exit_code == 1 and "--concept 'texture'" in failed.output and "Traceback" not in failed.output
    )


def test_bad_options_are_refused_in_one_line_before_any_work(toy_store, held_out, tmp_path):
    out = tmp_path / "out"
    base = ["edit", "--store", toy_store, "--dataset", held_out, "--out", out, "--device", "cpu"]
    for bad, words in (
        (["--alpha", "nan"], ("'--alpha'", "not a finite number")),
        (["--alpha", "-inf"], ("'--alpha'", "not a finite number")),
        (["--k", "0"], ("'--k'", "greater than or equal to 1")),
        (["--words", "red,blue"], ("--words needs --control-words",)),
    ):
        line = one_line_error(invoke([*base, *bad], exit_code=1))
        assert all(w in line for w in words), line
    assert not out.exists()  # nothing cached, no edit.json


def test_a_model_of_another_depth_is_refused_saying_both(toy_store, held_out, shallow_model, tmp_path):
    line = one_line_error(
        invoke(
            [
                "edit",
                "--store",
                toy_store,
                "--dataset",
                held_out,
                "--model",
                shallow_model,
                "--k",
                "1",
                "--seeds",
                "1",
                "--images",
                "2",
                "--out",
                tmp_path,
                "--device",
                "cpu",
            ],
            exit_code=1,
        )
    )
    assert "disagree" in line and "12 layers x 4 heads" in line and "6 x 4" in line, line
    assert "conflicting sizes" not in line
