"""Attention knockout, activation patching and attribution patching (mechhi.flow), each
against an independent reference: eager attention with the mask entries set by a plain
forward pre-hook, o_proj inputs replaced by a plain hook, and the exact counterfactual."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import mechhi.bundled as bundled
from mechhi.data.format import load_dataset
from mechhi.data.synthetic import render_counterfactual, render_one
from mechhi.flow.attribution import attribute_heads
from mechhi.flow.counterfactual import make_pair
from mechhi.flow.groups import GroupError, TokenGroups, token_groups
from mechhi.flow.knockout import Knockout, KnockoutRunner, blocked_edges, windows
from mechhi.flow.patching import Patcher, summarise
from mechhi.models.loading import load
from mechhi.trace.sites import resolve


@pytest.fixture(scope="module")
def toy():
    return load(bundled.BUNDLED_MODEL_ID, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def samples():
    return load_dataset(bundled.BUNDLED_DATASET).samples[:3]


def _batch(adapter, samples):
    batch = adapter.prepare([s.image() for s in samples], [s.description for s in samples])
    groups = [token_groups(layout, s.mask()) for layout, s in zip(batch.layouts, samples)]
    return batch, groups


def test_groups_partition_the_image_and_name_the_answer(toy, samples):
    _, adapter = toy
    batch, groups = _batch(adapter, samples)
    for layout, g in zip(batch.layouts, groups):
        assert np.array_equal(g["description"], layout.query_positions)
        assert g["last"].tolist() == [layout.query_positions[0] - 1]
        assert sorted([*g["object"], *g["background"]]) == g["image"].tolist()
        assert 0 < len(g["object"]) < len(g["image"])
        assert not set(g["question"]) & set(g["image"])
    with pytest.raises(GroupError, match="unknown token group 'nope'"):
        groups[0]["nope"]


@pytest.mark.parametrize("heads", [None, (0, 2)])
def test_knockout_equals_eager_with_the_mask_entries_set_by_hand(toy, samples, heads):
    model, adapter = toy
    eager, eager_adapter = load(
        bundled.BUNDLED_MODEL_ID, device="cpu", dtype="float32", attn_implementation="eager"
    )
    batch, groups = _batch(adapter, samples)
    knockout = Knockout("image", "description", (1, 2, 3), heads)
    out = KnockoutRunner(model, adapter).logits(batch, groups, knockout)
    seq = batch.inputs["input_ids"].shape[1]
    blocked = blocked_edges(groups, "image", "description", seq)
    hooks = []

    def close(module, args, kwargs):
        mask = kwargs["attention_mask"]  # eager: additive float (B, 1, T, S)
        mask = mask.expand(mask.shape[0], adapter.n_heads, *mask.shape[2:]).clone()
        for h in heads or range(adapter.n_heads):
            mask[:, h][blocked] = torch.finfo(mask.dtype).min
        kwargs["attention_mask"] = mask
        return args, kwargs

    layers = resolve(eager, eager_adapter.decoder_layers)
    for layer in knockout.layers:
        hooks.append(
            resolve(layers[layer], eager_adapter.attention).register_forward_pre_hook(close, with_kwargs=True)
        )
    try:
        with torch.no_grad():
            reference = eager(**batch.inputs).logits
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(out, reference.float(), atol=2e-4, rtol=1e-4)
    with torch.no_grad():
        plain = model(**batch.inputs).logits
    assert (out - plain).abs().max() > 0.05  # the knockout does something


def test_a_knockout_of_nothing_is_the_plain_forward_bit_for_bit(toy, samples):
    model, adapter = toy
    batch, groups = _batch(adapter, samples)
    empty = [TokenGroups({**g.positions, "object": np.zeros(0, dtype=np.int64)}) for g in groups]
    runner = KnockoutRunner(model, adapter)
    with torch.no_grad():
        plain = model(**batch.inputs).logits.float()
    assert torch.equal(runner.logits(batch, empty, Knockout("object", "last", (0, 1, 2))), plain)
    assert torch.equal(runner.logits(batch, groups, None), plain)


def test_knockout_refuses_layers_and_heads_outside_the_model(toy, samples):
    model, adapter = toy
    batch, groups = _batch(adapter, samples)
    runner = KnockoutRunner(model, adapter)
    with pytest.raises(ValueError, match=r"layers \[99\] outside"):
        runner.logits(batch, groups, Knockout("image", "last", (99,)))
    with pytest.raises(ValueError, match=r"heads \[7\] outside"):
        runner.logits(batch, groups, Knockout("image", "last", (0,), (7,)))
    assert windows(12, 5) == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9), (7, 8, 9, 10, 11)]


@pytest.mark.parametrize("change", ["colour", "remove"])
def test_a_toy_counterfactual_changes_only_the_object_pixels(change):
    record, image = render_one(3, seed=5)
    changed, counter = render_counterfactual(3, 0, change, seed=5)
    differs = (np.asarray(changed, dtype=int) != np.asarray(image, dtype=int)).any(-1)
    mask = record.objects[0].mask()
    assert differs.any() and not (differs & ~mask).any()
    assert (counter is None) == (change == "remove")
    if counter:
        assert (
            counter != record.objects[0].description
            and counter.split()[-1] == record.objects[0].description.split()[-1]
        )


def test_the_counterfactual_of_a_dataset_sample_rerenders_its_scene(samples):
    pair = make_pair(samples[0], "colour", dataset=bundled.BUNDLED_DATASET)
    differs = (np.asarray(pair.corrupted, dtype=int) != np.asarray(pair.clean, dtype=int)).any(-1)
    assert (
        differs.any() and not (differs & ~samples[0].mask()).any()
    )  # same scene, only the object recoloured


def _hooked_patch(model, adapter, pair, patcher, heads):
    """Reference: the corrupted run with o_proj's input columns of ``heads`` replaced by the
    clean run's, through plain torch hooks (no nnsight)."""
    clean, corrupted, metric = patcher.prepared(pair)
    layers = resolve(model, adapter.decoder_layers)
    projections = [resolve(layers[i], f"{adapter.attention}.o_proj") for i in range(len(layers))]
    saved = {}
    hooks = [
        p.register_forward_pre_hook(lambda m, a, i=i: saved.__setitem__(i, a[0].clone()))
        for i, p in enumerate(projections)
    ]
    with torch.no_grad():
        model(**clean.inputs)
    for h in hooks:
        h.remove()
    d = patcher.head_dim

    def replace(layer):
        def hook(module, args):
            x = args[0].clone()
            for l, h in heads:
                if l == layer:
                    x[:, :, h * d : (h + 1) * d] = saved[layer][:, :, h * d : (h + 1) * d]
            return (x,)

        return hook

    hooks = [projections[l].register_forward_pre_hook(replace(l)) for l in {l for l, _ in heads}]
    try:
        with torch.no_grad():
            return float(metric(model(**corrupted.inputs).logits)[0])
    finally:
        for h in hooks:
            h.remove()


def test_exact_head_patching_equals_a_hooked_reference(toy, samples):
    model, adapter = toy
    patcher = Patcher(model, adapter, batch_size=7)  # chunks split layers: every path of the batching runs
    pair = make_pair(samples[1], "colour", dataset=bundled.BUNDLED_DATASET)
    terms = patcher.patch_heads(pair)
    assert (
        terms["clean"] > terms["corrupted"]
    )  # the clean word wins on the clean image, not on the counterfactual
    for layer, head in [(0, 0), (6, 2), (11, 3)]:
        expected = _hooked_patch(model, adapter, pair, patcher, [(layer, head)])
        assert terms["patched"][layer, head] == pytest.approx(expected, abs=1e-4)


def test_patching_clean_into_clean_changes_nothing(toy, samples):
    model, adapter = toy
    patcher = Patcher(model, adapter)
    pair = make_pair(samples[0], "colour", dataset=bundled.BUNDLED_DATASET)
    same = dataclasses.replace(pair, corrupted=pair.clean)
    terms = patcher.patch_heads(same)
    np.testing.assert_allclose(terms["patched"], terms["clean"], atol=1e-5)
    residual = patcher.patch_residual(pair, ["image", "description"])
    assert residual["patched"].shape == (len(patcher.layers), 2)
    # the whole residual stream at the description after the last layer is the clean run's answer
    assert residual["patched"][-1, 1] == pytest.approx(residual["clean"], abs=1e-3)


def test_summarise_normalises_with_a_delta_method_se():
    terms = [
        {"clean": 4.0, "corrupted": 0.0, "patched": np.array([2.0, 0.0])},
        {"clean": 2.0, "corrupted": 0.0, "patched": np.array([2.0, 1.0])},
    ]
    result = summarise(terms)
    np.testing.assert_allclose(result["effect"], [4.0 / 6.0, 1.0 / 6.0])  # mean gained / mean gap
    assert float(result["gap"]) == 3.0
    gained, gap = np.array([2.0, 2.0]), np.array([4.0, 2.0])
    by_hand = ((gained - (4 / 6) * gap) / 3.0).std(ddof=1) / np.sqrt(2)
    assert result["se"][0] == pytest.approx(by_hand)


def test_attribution_ranks_heads_as_exact_patching_does_and_leaves_the_weights_alone(toy, samples):
    model, adapter = toy
    patcher = Patcher(model, adapter)
    exact, approx = [], []
    for sample in samples[:2]:
        pair = make_pair(sample, "colour", dataset=bundled.BUNDLED_DATASET)
        exact.append(patcher.patch_heads(pair))
        approx.append(attribute_heads(patcher, pair))
        assert approx[-1]["clean"] == pytest.approx(exact[-1]["clean"], abs=1e-5)
        assert approx[-1]["corrupted"] == pytest.approx(exact[-1]["corrupted"], abs=1e-5)
    rho = spearmanr(summarise(exact)["effect"].ravel(), summarise(approx)["effect"].ravel()).statistic
    assert rho > 0.7
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_patch_and_knockout_commands(tmp_path, toy):
    from typer.testing import CliRunner

    from mechhi.commands import app
    from mechhi.trace.trace_dataset import TraceConfig, trace_dataset

    store = tmp_path / "toy.zarr"
    trace_dataset(TraceConfig(store=str(store), limit=4, device="cpu"), progress=False, loaded=toy)
    runner = CliRunner()
    args = [
        "patch",
        "--store",
        str(store),
        "--limit",
        "2",
        "--method",
        "both",
        "--device",
        "cpu",
        "--dataset",
        str(bundled.BUNDLED_DATASET),
        "--split",
        "trace",
        "--json",
    ]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report["n_samples"] == 2 and -1 <= report["agreement"]["spearman"] <= 1
    again = json.loads(runner.invoke(app, args).stdout)
    assert again["results"]["exact"]["effect"] == report["results"]["exact"]["effect"]
    figure = tmp_path / "knockout.png"
    ran = runner.invoke(
        app,
        [
            "knockout",
            "--store",
            str(store),
            "--limit",
            "2",
            "--window",
            "6",
            "--device",
            "cpu",
            "--pairs",
            "image->description",
            "--dataset",
            str(bundled.BUNDLED_DATASET),
            "--split",
            "trace",
            "--out",
            str(tmp_path / "ko"),
            "--figure",
            str(figure),
            "--json",
        ],
    )
    assert ran.exit_code == 0, ran.output
    knocked = json.loads(ran.stdout)
    assert [r["window"] for r in knocked["rows"]] == [[0, 5], [6, 11]] and figure.stat().st_size > 1000
    assert (
        knocked["rows"][0]["change"]["answer_logprob"]["mean"] < 0
    )  # cutting the image off the answer hurts it
    bad = runner.invoke(app, ["knockout", "--store", str(store), "--pairs", "image->nowhere"])
    assert bad.exit_code == 1 and "unknown token group 'nowhere'" in bad.output
