"""Evaluation (perplexity against a hand loop, VQA items), the adapter audit, and the
whole Table 4 / Table 5 experiment end to end on a tiny model."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mechhi.data.format import load_dataset
from mechhi.data.vqa import option_pool, vqa_items
from mechhi.evaluate.audit import audit_adapter
from mechhi.evaluate.evaluate_run import EvalSettings, EvaluateConfig, evaluate_model, run_evaluate
from mechhi.evaluate.experiment import ExperimentConfig, run_experiment
from mechhi.finetune import TrainSettings, attach_lora
from tests.finetune_inputs import scored_store, tiny_dataset, toy_tiny


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp")
    model, adapter = toy_tiny(layers=6)
    return {
        "root": root,
        "data": tiny_dataset(root / "data", n_images=20),
        "model": model,
        "adapter": adapter,
    }


# ----------------------------------------------------------------------------- evaluation


def hand_perplexity(model, adapter, samples) -> float:
    """exp(mean over samples of mean answer-token NLL), one sample and one token at a time.

    The answer tokens are found here independently: with the word-level tokenizer they
    are the description's words, the last place they occur in the sequence.
    """
    per_sample = []
    for s in samples:
        batch = adapter.prepare([s.image()], [s.description])
        ids = batch.inputs["input_ids"][0].tolist()
        answer = adapter.tokenizer(s.description, add_special_tokens=False)["input_ids"]
        start = max(i for i in range(len(ids) - len(answer) + 1) if ids[i : i + len(answer)] == answer)
        with torch.no_grad():
            logits = model(**batch.inputs).logits[0].double()  # (T, vocab)
        nll = [
            -(torch.log_softmax(logits[t - 1], -1)[ids[t]]).item() for t in range(start, start + len(answer))
        ]
        per_sample.append(sum(nll) / len(nll))
    return math.exp(sum(per_sample) / len(per_sample))


def test_perplexity_equals_a_hand_loop(env):
    test = load_dataset(env["data"], split="test")
    samples = test.samples[:5]
    got = evaluate_model(
        env["model"], env["adapter"], samples, settings=EvalSettings(batch_size=3, generate=1)
    )
    assert got["perplexity"]["mean"] == pytest.approx(
        hand_perplexity(env["model"], env["adapter"], samples), rel=1e-4
    )
    assert got["n"] == 5 and got["perplexity"]["se"] > 0
    assert 0 <= got["vqa_accuracy"]["mean"] <= 1 and 0 < got["ans_prob"]["mean"] < 1
    assert isinstance(got["generations"][0]["generated"], str)
    json.dumps(got)  # JSON-able


def test_vqa_items_are_seeded_and_never_offer_a_second_true_option(env):
    test = load_dataset(env["data"], split="train")
    samples = test.samples
    images = [None] * len(samples)
    items = vqa_items(samples, images, seed=1, pool=option_pool(test))
    for s, item in zip(samples, items):
        assert item.options[item.answer] == s.description
        present = {o.description for o in s.record.objects}
        others = [o for i, o in enumerate(item.options) if i != item.answer]
        assert len(set(item.options)) == 4 and not present & set(others)
    again = vqa_items(samples, images, seed=1, pool=option_pool(test))
    assert [(i.options, i.answer) for i in again] == [(i.options, i.answer) for i in items]
    assert len(items) >= 8
    assert {i.answer for i in items} == {0, 1, 2, 3}  # the true letter moves


# ----------------------------------------------------------------------------- audit


def test_audit_flags_an_untrained_adapter(env):
    adapter = env["adapter"]
    probe = load_dataset(env["data"], split="test").samples[:2]
    model = copy.deepcopy(env["model"])
    assert audit_adapter(model, adapter, probe)["flags"] == ["not loaded: the model carries no LoRA modules"]
    peft_model = attach_lora(model, adapter, [1, 4])
    untrained = audit_adapter(peft_model, adapter, probe, expected_layers=[1, 4])
    assert untrained["lora_B_norm"] == 0.0 and untrained["probe_max_abs_logit_shift"] == 0.0
    assert [f.split(":")[0] for f in untrained["flags"]] == ["untrained", "inactive"]
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    trained = audit_adapter(peft_model, adapter, probe, expected_layers=[1, 4])
    assert trained["flags"] == [] and trained["lora_B_norm"] > 0 and trained["probe_max_abs_logit_shift"] > 0
    assert trained["lora_layers"] == [1, 4]
    wrong = audit_adapter(peft_model, adapter, probe, expected_layers=[2, 3])
    assert wrong["flags"] == ["wrong layers: LoRA on [1, 4], expected [2, 3]"]


# ----------------------------------------------------------------------------- end to end

TINY_TRAIN = TrainSettings(
    max_steps=2, batch_size=2, grad_accum=1, lr=1e-2, warmup=1, eval_every=2, val_limit=2, checkpoint_every=2
)
TINY_EVAL = EvalSettings(limit=4, batch_size=4, generate=1, max_new_tokens=4, probe_size=2)


def test_experiment_end_to_end(env):
    root = env["root"]
    store = scored_store(root / "s.zarr", 6, np.array([0.2, 0.6, 0.1, 0.5, 0.4, 0.3]))
    config = ExperimentConfig(
        store=str(store),
        model="tiny-toy",
        dataset=str(env["data"]),
        out=str(root / "out"),
        k=1,
        random_seeds=(0, 1),
        train=TINY_TRAIN,
        eval=TINY_EVAL,
    )
    model = copy.deepcopy(env["model"])
    report = run_experiment(config, loaded=(model, env["adapter"]), progress=False)
    names = [e["name"] for e in report["setups"]]
    assert names == [
        "original",
        "top-1",
        "bottom-1",
        "random-1 (seed 0)",
        "random-1 (seed 1)",
        "depth-1 (seed 0)",
        "depth-1 (seed 1)",
        "full",
    ]
    layers = {e["name"]: e["layers"] for e in report["setups"]}
    assert layers["top-1"] == [1] and layers["bottom-1"] == [2] and layers["full"] == list(range(6))
    assert all(layer in (0, 3, 4, 5) for key in names if key.startswith("random") for layer in layers[key])
    # depth-1: a neighbour of top layer 1 within 0.2 of depth (layer / 5), i.e. layer 0 or 2
    assert all(layers[f"depth-1 (seed {s})"] in ([0], [2]) for s in (0, 1))
    # Table 5: r (in + out) for q, k, v per layer, hand-computed from the config
    hidden = model.config.text_config.hidden_size
    kv = model.config.text_config.num_key_value_heads * (
        hidden // model.config.text_config.num_attention_heads
    )
    per_layer = 8 * ((hidden + hidden) + 2 * (hidden + kv))
    t5 = {r["setup"]: r for r in report["table5"]}
    assert t5["original"]["trainable"] == 0 and t5["top-1"]["trainable"] == per_layer
    assert t5["full"]["trainable"] == 6 * per_layer
    assert t5["full"]["trainable_pct"] == pytest.approx(100 * 6 * per_layer / t5["full"]["total"])
    # Table 4: one cell per column, random-1 aggregated over its two seeds, a largest shift named
    by_name = {e["name"]: e["metrics"] for e in report["setups"]}
    for row in report["table4"]:
        cells, metric = row["cells"], row["metric"]
        assert list(cells) == ["original", "top-1", "bottom-1", "random-1", "depth-1", "full"]
        assert (
            cells["random-1"]["n_seeds"] == 2
            and cells["depth-1"]["n_seeds"] == 2
            and cells["original"]["shift"] == 0
        )
        seeds = [by_name[f"random-1 (seed {k})"][metric]["mean"] for k in (0, 1)]
        assert cells["random-1"]["mean"] == pytest.approx(np.mean(seeds))
        assert cells["random-1"]["spread_sd"] == pytest.approx(np.std(seeds, ddof=1))
        base = by_name["original"][metric]["mean"]
        expected = {g: abs(cells[g]["mean"] - base) for g in cells if g != "original"}
        assert row["largest_shift"] == max(expected, key=expected.get)
    # a draw that repeats an earlier setup's layers takes over its adapter and numbers instead of
    # training again
    first = {}
    for e in report["setups"][1:]:
        twin = first.setdefault(tuple(e["layers"]), e)
        assert e.get("same_as") == (None if twin is e else twin["name"])
        assert e["metrics"] == twin["metrics"] and e["adapter"] == twin["adapter"]
    assert len({e["adapter"] for e in report["setups"][1:]}) == len(first) < 7  # seeds here do repeat a draw
    assert sorted(p.name for p in (root / "out" / "adapters").iterdir()) == sorted(
        Path(e["adapter"]).name for e in first.values()
    )
    assert report["flagged"] == {}  # every adapter trained and active
    for row in report["audit"]:
        assert row["lora_B_norm"] > 0 and row["probe_shift"] > 0 and row["steps"] == 2
    out = root / "out"
    saved = json.loads((out / "results.json").read_text())
    assert [e["name"] for e in saved["setups"]] == names
    rows = list(csv.DictReader((out / "table4.csv").read_text().splitlines()))
    assert {r["setup"] for r in rows} == {"original", "top-1", "bottom-1", "random-1", "depth-1", "full"}
    assert len(rows) == 18
    assert [r["setup"] for r in csv.DictReader((out / "table5.csv").read_text().splitlines())] == names
    assert len(list(csv.DictReader((out / "audit.csv").read_text().splitlines()))) == 7
    assert not any("lora" in n for n, _ in model.named_parameters())  # the base model is plain again

    # `mechhi evaluate --adapter DIR` reproduces the experiment's numbers for that setup
    top = next(e for e in report["setups"] if e["name"] == "top-1")
    again = run_evaluate(
        EvaluateConfig(adapter=top["adapter"], model="tiny-toy", dataset=str(env["data"]), eval=TINY_EVAL),
        loaded=(model, env["adapter"]),
        progress=False,
    )
    assert again["metrics"]["perplexity"] == pytest.approx(top["metrics"]["perplexity"])
    assert again["audit"]["flags"] == [] and again["params"]["trainable"] == per_layer
    base = run_evaluate(
        EvaluateConfig(model="tiny-toy", dataset=str(env["data"]), eval=TINY_EVAL),
        loaded=(model, env["adapter"]),
        progress=False,
    )
    original = report["setups"][0]["metrics"]["perplexity"]["mean"]
    assert base["metrics"]["perplexity"]["mean"] == pytest.approx(original)
    assert top["metrics"]["perplexity"]["mean"] != pytest.approx(original)


def test_experiment_reads_the_dataset_loads_the_model_and_decodes_each_image_once(env, tmp_path, monkeypatch):
    import mechhi.models.loading
    from mechhi.data.format import ANNOTATIONS, Sample

    reads, loads, decoded = [], [], []
    real_read, real_image = Path.read_bytes, Sample.image

    def read_bytes(path: Path) -> bytes:
        if path.name == ANNOTATIONS:
            reads.append(path)
        return real_read(path)

    def image(sample: Sample):
        decoded.append(sample.image_path)
        return real_image(sample)

    def load(*args, **kwargs):
        loads.append(args)
        return copy.deepcopy(env["model"]), env["adapter"]

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(Sample, "image", image)
    monkeypatch.setattr(mechhi.models.loading, "load", load)
    store = scored_store(tmp_path / "s.zarr", 6, np.array([0.2, 0.6, 0.1, 0.5, 0.4, 0.3]))
    config = ExperimentConfig(
        store=str(store),
        model="tiny-toy",
        dataset=str(env["data"]),
        out=str(tmp_path / "out"),
        k=1,
        random_seeds=(0,),
        train=TINY_TRAIN,
        eval=TINY_EVAL,
    )
    report = run_experiment(config, progress=False)
    assert len(report["setups"]) == 6
    assert len(reads) == 1 and len(loads) == 1  # for six setups
    assert len(decoded) == len(set(decoded)) > 0  # no image file decoded twice
    again = run_experiment(config, progress=False)  # every setup cached: no model is loaded
    assert len(loads) == 1
    assert [e["metrics"] for e in again["setups"]] == [e["metrics"] for e in report["setups"]]


def test_experiment_refuses_an_unscored_store_before_training(env, tmp_path):
    from mechhi.finetune import SelectionError
    from mechhi.store import SampleMeta, create_store

    create_store(
        tmp_path / "u.zarr",
        samples=[SampleMeta("0", "0", "a", {"image": (1, 1)})],
        n_layers=6,
        n_heads=2,
        maps=False,
        attrs={
            "model": "m",
            "model_revision": "",
            "dtype": "float32",
            "prompt_template": "caption",
            "dataset": "d",
        },
    )
    config = ExperimentConfig(
        store=str(tmp_path / "u.zarr"), dataset=str(env["data"]), out=str(tmp_path / "o"), k=1
    )
    with pytest.raises(SelectionError, match="no head_impact"):
        run_experiment(config, loaded=(env["model"], env["adapter"]), progress=False)
