"""`mechhi pursuit`: concept words to atoms, and the job end to end on the bundled model."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from mechhi.commands import app
from mechhi.scoring.pursuit import PursuitConfig, concept_dictionary, run_pursuit, single_token_ids
from probes.head_pursuit import somp
from tests.conftest import tiny


def test_words_become_single_tokens_or_are_refused_by_name():
    _, adapter = tiny("qwen2-vl", "gqa")
    ids = single_token_ids(adapter.tokenizer, ["red", "circle"])
    assert adapter.tokenizer.convert_ids_to_tokens(ids) == ["red", "circle"]
    with pytest.raises(
        ValueError, match="not single tokens for this tokenizer .split or unknown.: chartreuse"
    ):
        single_token_ids(adapter.tokenizer, ["red", "chartreuse"])


def test_dictionary_is_the_unembedding_rows_of_the_words():
    model, adapter = tiny("qwen2-vl", "gqa")
    rows = concept_dictionary(model, adapter, ["green", "star"])
    ids = adapter.tokenizer.convert_tokens_to_ids(["green", "star"])
    np.testing.assert_array_equal(rows, model.lm_head.weight[ids].detach().numpy())


def test_config_refuses_what_pursuit_cannot_do():
    with pytest.raises(ValueError, match="k=7"):
        PursuitConfig(words=("red", "green", "blue", "yellow"), k=7)
    with pytest.raises(ValueError, match="two distinct"):
        PursuitConfig(words=("red", "red"))
    with pytest.raises(ValueError, match="choose from image, answer"):
        PursuitConfig(words=("red", "green", "blue", "yellow"), positions="prompt")


def test_pursuit_on_the_bundled_model_ranks_every_head(toy_model):
    config = PursuitConfig(
        limit=8, k=2, words=("red", "green", "blue", "yellow"), device="cpu", dtype="float32"
    )
    result = run_pursuit(config, progress=False, loaded=toy_model)
    model, adapter = toy_model
    assert result.explained.shape == (adapter.n_layers, adapter.n_heads)
    explained = result.explained.values
    assert np.all((explained >= 0) & (explained <= 1 + 1e-9))
    assert set(np.unique(result.top_word.values)) <= set(config.words)
    curve = result.explained_curve.values
    assert np.all(np.diff(curve, axis=-1) >= -1e-9), "explained variance cannot fall as atoms are added"
    # one head against SOMP on signals collected here, independently of the job
    from mechhi.scoring.pursuit import head_signals
    from mechhi.trace.trace_dataset import TraceConfig, load_samples

    samples = load_samples(TraceConfig(), adapter).samples[:8]
    signals = head_signals(model, adapter, samples, positions="image", batch_size=3, progress=False)
    direct = somp(signals.sel(layer=5, head=1).values, concept_dictionary(model, adapter, config.words), k=2)
    assert float(result.explained.sel(layer=5, head=1)) == pytest.approx(direct.explained[-1], abs=1e-6)


def test_cli_pursuit_json_and_errors():
    runner = CliRunner()
    result = runner.invoke(
        app, ["pursuit", "--limit", "6", "--k", "2", "--top", "5", "--device", "cpu", "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert (
        payload["words"] == ["red", "green", "blue", "yellow", "purple", "orange"] and payload["samples"] == 6
    )
    heads = payload["heads"]
    assert len(heads) == 5 and [h["rank"] for h in heads] == [1, 2, 3, 4, 5]
    assert all(a["explained"] >= b["explained"] for a, b in itertools.pairwise(heads))
    assert all(0.0 <= h["explained_random"] <= 1.0 for h in heads)
    bad = runner.invoke(
        app, ["pursuit", "--limit", "2", "--words", "red,chartreuse,blue", "--k", "2", "--device", "cpu"]
    )
    assert bad.exit_code == 1 and "chartreuse" in bad.output and "Traceback" not in bad.output
