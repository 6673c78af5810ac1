"""LoRA fine-tuning from a store's ranking: layer selection (depth-matched control
included), LoRA placement on every family, the sample order, the per-sample loss,
training on accelerate, loading once, and exact resume after an interruption (also one
in the middle of writing a checkpoint)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import load_file

from mechhi.finetune import (
    CHECKPOINT_DIR,
    SELECTION_FILE,
    FinetuneConfig,
    FinetuneData,
    SelectionError,
    TrainSettings,
    attach_lora,
    finetune,
    lora_norms,
    parameter_counts,
    select_layers,
    validation_loss,
)
from mechhi.models import FAMILIES
from mechhi.models.tiny import CASES
from tests.conftest import tiny
from tests.finetune_inputs import scored_store, tiny_dataset, toy_tiny

# ----------------------------------------------------------------------------- helpers

# Hand-made ranking: mean HI over heads per layer (heads differ, means are exact).
LAYER_MEANS = np.array([0.5, 0.9, 0.1, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 0.0])
TOP3, BOTTOM3 = {1, 5, 3}, {9, 2, 6}


def hand_store(means: np.ndarray = LAYER_MEANS) -> xr.Dataset:
    """head_impact (layer, 2 heads) whose per-layer means are ``means``."""
    spread = np.array([-0.05, 0.05])
    hi = means[:, None] + spread[None, :]  # (layer, head)
    return xr.Dataset(
        {"head_impact": (("layer", "head"), hi)},
        coords={"layer": np.arange(len(means)), "head": [0, 1]},
        attrs={"model": "hand", "dataset": "nowhere#abc"},
    )


FAST = TrainSettings(
    max_steps=4,
    batch_size=2,
    grad_accum=2,
    lr=1e-2,
    warmup=1,
    eval_every=2,
    patience=0,
    val_limit=4,
    checkpoint_every=1,
)


# ----------------------------------------------------------------------------- selection


def test_select_layers_top_bottom_by_hand():
    ds = hand_store()
    assert set(select_layers(ds, "top-3").layers) == TOP3
    assert set(select_layers(ds, "bottom-3").layers) == BOTTOM3
    assert select_layers(ds, "top-1").layers == (1,)
    assert select_layers(ds, "bottom-1").layers == (9,)
    assert select_layers(ds, "full").layers == tuple(range(10))
    assert select_layers(ds, "layers=7,3").layers == (3, 7)


def test_random_k_is_disjoint_seeded_and_varies():
    ds = hand_store()
    pool = set(range(10)) - TOP3 - BOTTOM3  # {0, 4, 7, 8}
    draws = {select_layers(ds, "random-3", seed=s).layers for s in range(12)}
    for layers in draws:
        assert len(layers) == 3 and set(layers) <= pool
    assert len(draws) > 1  # the seed matters
    assert select_layers(ds, "random-3", seed=5).layers == select_layers(ds, "random-3", seed=5).layers
    assert select_layers(ds, "random-2", seed=0).provenance["random_seed"] == 0


def test_selection_errors_are_clear():
    ds = hand_store()
    with pytest.raises(SelectionError, match="needs 12 ranked layers"):
        select_layers(ds, "random-4")
    with pytest.raises(SelectionError, match="mechhi rank"):
        select_layers(ds.drop_vars("head_impact").assign(iou=(("layer",), np.ones(10))), "top-2")
    for bad in ("top4", "top-0", "layers=", "middle-2"):
        with pytest.raises(SelectionError, match="layer selection"):
            select_layers(ds, bad)
    with pytest.raises(SelectionError, match=r"layers \[12\] not in the store"):
        select_layers(ds, "layers=1,12")


def test_nan_layers_are_never_ranked():
    means = LAYER_MEANS.copy()
    means[1] = np.nan  # the would-be best layer
    ds = hand_store(means)
    assert 1 not in select_layers(ds, "top-3").layers
    assert 1 not in select_layers(ds, "bottom-3").layers


def test_provenance_from_a_store_on_disk(tmp_path):
    path = scored_store(tmp_path / "s.zarr", 6, np.array([0.2, 0.6, 0.1, 0.5, 0.4, 0.3]))
    sel = select_layers(path, "top-2")
    assert sel.layers == (1, 3)
    prov = sel.provenance
    assert (
        prov["store"] == str(path.resolve()) and prov["model"] == "tiny-toy" and prov["dataset"] == "tiny#0"
    )
    assert [r["layer"] for r in prov["ranking"]] == [1, 3, 4, 5, 0, 2]
    other = scored_store(tmp_path / "t.zarr", 6, np.array([0.2, 0.6, 0.1, 0.5, 0.4, 0.31]))
    assert (
        select_layers(other, "top-2").provenance["head_impact_fingerprint"] != prov["head_impact_fingerprint"]
    )


def _valid_depth_matchings(top, pool, depth, band):
    """Every assignment of distinct non-top layers to the top layers, each within the band:
    the independent reference for depth-K (brute force)."""
    import itertools

    return {
        tuple(sorted(choice))
        for choice in itertools.permutations(pool, len(top))
        if all(abs(depth(l) - depth(t)) <= band + 1e-12 for t, l in zip(top, choice))
    }


def test_depth_k_matches_each_top_layer_within_its_band():
    ds = hand_store()  # 10 layers, depth l / 9: a band of 0.2 is +-1 layer
    top, pool = sorted(TOP3), sorted(set(range(10)) - TOP3)
    valid = _valid_depth_matchings(top, pool, lambda l: l / 9, 0.2)
    draws = {}
    for seed in range(20):
        sel = select_layers(ds, "depth-3", seed=seed)
        assert sel.layers in valid and not set(sel.layers) & TOP3
        pairs = sel.provenance["depth_pairs"]
        assert sorted(p["top"] for p in pairs) == top and not any(p["widened"] for p in pairs)
        assert sel.provenance["depth_seed"] == seed and sel.provenance["depth_band"] == 0.2
        draws[seed] = sel.layers
    assert len(set(draws.values())) > 1  # the seed matters
    assert select_layers(ds, "depth-3", seed=7).layers == draws[7]  # and fixes the draw
    wide = select_layers(ds, "depth-3", seed=0, depth_band=1.0)  # every non-top layer is in every band
    assert len(wide.layers) == 3 and not set(wide.layers) & TOP3


def test_depth_k_widens_a_used_up_band_to_the_nearest_layers_left():
    ds = hand_store()
    sel = select_layers(ds, "depth-3", seed=0, depth_band=0.0)  # no band has a member: all widened
    pairs = sel.provenance["depth_pairs"]
    assert all(p["widened"] for p in pairs)
    taken: set[int] = set()
    for p in pairs:  # each partner is among the nearest layers still free when it was drawn
        free = set(range(10)) - TOP3 - taken
        nearest = min(abs(l - p["top"]) for l in free)
        assert abs(p["layer"] - p["top"]) == nearest and p["depth_gap"] == pytest.approx(nearest / 9)
        taken.add(p["layer"])
    with pytest.raises(SelectionError, match="needs 12 ranked layers to keep depth-K apart from top-K"):
        select_layers(ds, "depth-6")


def test_sample_order_is_a_pure_function_of_the_step_and_splits_over_ranks():
    from mechhi.finetune import epoch_order, micro_batch, rank_part

    n, seed, size = 7, 3, 4
    stream = np.concatenate([epoch_order(n, seed, e) for e in range(6)])  # the reference: epochs end to end
    for j in range(9):
        got = micro_batch(n, seed=seed, index=j, size=size)
        np.testing.assert_array_equal(got, stream[j * size : (j + 1) * size])
        halves = [rank_part(got, rank=r, world=2) for r in range(2)]
        assert [len(h) for h in halves] == [2, 2]
        np.testing.assert_array_equal(np.concatenate(halves), got)
    assert sorted(stream[:n]) == list(range(n))  # each epoch is a permutation
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        rank_part(np.arange(4), rank=0, world=3)


def test_sample_loss_is_the_mean_of_per_sample_answer_nll(tmp_path):
    from mechhi.finetune import answer_loss

    model, adapter = toy_tiny()
    images = [s.image() for s in FinetuneData.read(tiny_dataset(tmp_path / "d")).train[:4]]
    answers = ["a red circle", "a large blue star", "circle", "a small green square"]  # 3, 4, 1, 4 tokens
    per_sample = []
    for image, answer in zip(images, answers):  # reference: one sample at a time, one token at a time
        batch = adapter.prepare([image], [answer])
        ids = batch.inputs["input_ids"][0]
        with torch.no_grad():
            logp = torch.log_softmax(model(**batch.inputs).logits[0].double(), -1)
        per_sample.append(
            float(np.mean([-logp[t - 1, ids[t]].item() for t in batch.layouts[0].query_positions]))
        )
    with torch.no_grad():
        whole = answer_loss(model, adapter.prepare(images, answers), reduction="sample")
        halves = [
            answer_loss(model, adapter.prepare(images[i : i + 2], answers[i : i + 2]), reduction="sample")
            for i in (0, 2)
        ]
        tokens = answer_loss(model, adapter.prepare(images, answers))
    assert float(whole) == pytest.approx(np.mean(per_sample), rel=1e-5)
    assert float(whole) == pytest.approx(
        float(sum(halves) / 2), rel=1e-5
    )  # what DDP's average over 2 ranks gives
    assert float(tokens) != pytest.approx(float(whole), rel=1e-3)  # the token mean weighs long answers more


# ----------------------------------------------------------------------------- LoRA placement


def _expected_qkv(model: torch.nn.Module, prefix: str, layers: list[int]) -> set[str]:
    """Independent expectation: q/k/v Linear modules under the decoder layers' prefix."""
    out = set()
    for name, module in model.named_modules():
        parts = name.split(".")
        if not isinstance(module, torch.nn.Linear) or parts[-1] not in ("q_proj", "k_proj", "v_proj"):
            continue
        head = name[: -len(parts[-1]) - 1]  # <prefix>.<i>.self_attn
        for i in layers:
            if head == f"{prefix}.{i}.self_attn":
                out.add(name)
    return out


@pytest.mark.parametrize("family", FAMILIES, ids=[f.family for f in FAMILIES])
def test_lora_goes_on_exactly_the_chosen_qkv(family):
    case = next(iter(CASES[family.family]))
    base, adapter = tiny(family.family, case)
    model = copy.deepcopy(base)  # peft edits in place; the cached tiny model is shared
    n_layers = adapter.n_layers
    chosen = [n_layers - 1]
    expected = _expected_qkv(model, adapter.decoder_layers, chosen)
    assert len(expected) == 3
    vision_linears = [
        n
        for n, m in model.named_modules()
        if n.startswith(adapter.vision_tower) and isinstance(m, torch.nn.Linear)
    ]
    assert vision_linears  # the tower exists, so "never matched" below is a real check
    sizes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if n in expected}

    peft_model = attach_lora(model, adapter, chosen)
    from peft.tuners.lora import LoraLayer

    wrapped = {
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)
    }
    assert wrapped == expected
    assert not any(n.startswith(adapter.vision_tower) for n in wrapped)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.{n}.lora_{ab}.default.weight" for n in expected for ab in "AB"}
    counts = parameter_counts(peft_model)
    assert counts["trainable"] == sum(8 * (i + o) for i, o in sizes.values())  # r (in + out) per module
    assert counts["total"] == sum(p.numel() for p in base.parameters()) + counts["trainable"]
    assert lora_norms(peft_model)["lora_B"] == 0.0  # B starts at zero
    peft_model.unload()


def test_full_selection_wraps_every_decoder_layer():
    base, adapter = tiny("qwen2-vl", "gqa")
    model = copy.deepcopy(base)
    expected = _expected_qkv(model, adapter.decoder_layers, list(range(adapter.n_layers)))
    assert len(expected) == 3 * adapter.n_layers
    peft_model = attach_lora(model, adapter, list(range(adapter.n_layers)))
    from peft.tuners.lora import LoraLayer

    assert {
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)
    } == expected
    peft_model.unload()
    assert not any("lora" in n for n, _ in model.named_parameters())  # unload gives the plain model back


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    model, adapter = toy_tiny()
    return {
        "root": root,
        "data": tiny_dataset(root / "data"),
        "store": scored_store(root / "s.zarr", 4),
        "model": model,
        "adapter": adapter,
    }


def _config(setup, out: Path, **kw) -> FinetuneConfig:
    return FinetuneConfig(
        **{
            "store": str(setup["store"]),
            "select": "top-2",
            "out": str(out),
            "dataset": str(setup["data"]),
            "model": "tiny-toy",
            "train": FAST,
            **kw,
        }
    )


def test_training_lowers_the_loss_and_trains_lora_b(setup):
    from mechhi.finetune import load_split

    model, adapter = copy.deepcopy(setup["model"]), setup["adapter"]
    val = load_split(setup["data"], "val", FAST.val_limit).samples
    before = validation_loss(model, adapter, val, batch_size=4)
    result = finetune(_config(setup, setup["root"] / "a"), loaded=(model, adapter), progress=False)
    assert result.selection.layers == (0, 1)  # linspace means, descending: layers 0 and 1 rank top
    assert result.history.best_loss < before - 0.05
    assert result.norms["lora_B"] > 0
    assert len(result.history.train) == FAST.max_steps and [v["step"] for v in result.history.val] == [2, 4]
    meta = json.loads((result.out / SELECTION_FILE).read_text())
    assert meta["selection"]["layers"] == [0, 1]
    assert meta["selection"]["provenance"]["model"] == "tiny-toy"
    assert meta["params"]["trainable"] == result.params["trainable"] > 0
    assert (result.out / "adapter_model.safetensors").is_file()
    assert not any("lora" in n for n, _ in model.named_parameters())  # the caller's model is plain again
    again = finetune(_config(setup, setup["root"] / "a"), loaded=(model, adapter), progress=False)
    assert again.resumed_finished and again.history.best_loss == result.history.best_loss


class Interrupt(Exception):
    pass


def _same_adapter(a_dir: Path, b_dir: Path, atol: float = 0.0) -> None:
    a = load_file(a_dir / "adapter_model.safetensors")
    b = load_file(b_dir / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol)


@pytest.fixture(scope="module")
def straight(setup):
    """An uninterrupted run: the reference the interrupted ones must reproduce."""
    return finetune(
        _config(setup, setup["root"] / "straight"),
        loaded=(copy.deepcopy(setup["model"]), setup["adapter"]),
        progress=False,
    )


def test_resume_after_interruption_gives_the_same_adapter(setup, straight):
    def stop_at_2(step: int, loss: float) -> None:
        if step == 2:
            raise Interrupt

    out = setup["root"] / "resumed"
    with pytest.raises(Interrupt):
        finetune(
            _config(setup, out),
            loaded=(copy.deepcopy(setup["model"]), setup["adapter"]),
            progress=False,
            on_step=stop_at_2,
        )
    latest = json.loads((out / CHECKPOINT_DIR / "latest.json").read_text())
    assert latest["step"] == 2 and not (out / SELECTION_FILE).exists()
    resumed = finetune(
        _config(setup, out), loaded=(copy.deepcopy(setup["model"]), setup["adapter"]), progress=False
    )
    _same_adapter(straight.out, resumed.out)
    assert [r["loss"] for r in resumed.history.train] == [r["loss"] for r in straight.history.train]
    assert not (out / CHECKPOINT_DIR).exists()  # a finished run keeps only the adapter


def test_a_kill_while_writing_a_checkpoint_resumes_from_the_last_complete_one(setup, straight, monkeypatch):
    import accelerate.accelerator

    real, saves = accelerate.accelerator.save_custom_state, []

    def dies_in_the_third_save(obj, path, index=0, **kw):
        saves.append(path)
        if len(saves) == 3:  # the optimizer and RNG files of step 3 are written; the loop state is not
            raise Interrupt
        return real(obj, path, index, **kw)

    monkeypatch.setattr(accelerate.accelerator, "save_custom_state", dies_in_the_third_save)
    out = setup["root"] / "killed-mid-save"
    with pytest.raises(Interrupt):
        finetune(
            _config(setup, out), loaded=(copy.deepcopy(setup["model"]), setup["adapter"]), progress=False
        )
    monkeypatch.undo()
    half = out / CHECKPOINT_DIR / "step-00000003.partial"
    assert half.is_dir() and (half / "optimizer.bin").is_file()  # a half checkpoint is on disk ...
    assert (
        json.loads((out / CHECKPOINT_DIR / "latest.json").read_text())["step"] == 2
    )  # ... and not the latest
    resumed = finetune(
        _config(setup, out), loaded=(copy.deepcopy(setup["model"]), setup["adapter"]), progress=False
    )
    _same_adapter(straight.out, resumed.out)
    assert [r["loss"] for r in resumed.history.train] == [r["loss"] for r in straight.history.train]


def test_a_checkpoint_of_another_run_is_refused(setup):
    def stop_at_1(step: int, loss: float) -> None:
        raise Interrupt

    out = setup["root"] / "other-run"
    with pytest.raises(Interrupt):
        finetune(
            _config(setup, out),
            loaded=(copy.deepcopy(setup["model"]), setup["adapter"]),
            progress=False,
            on_step=stop_at_1,
        )
    other = _config(setup, out, select="top-1")
    with pytest.raises(ValueError, match="checkpoint of another fine-tuning run"):
        finetune(other, loaded=(copy.deepcopy(setup["model"]), setup["adapter"]), progress=False)


def test_images_are_decoded_once_and_validation_is_prepared_once(setup, monkeypatch):
    import mechhi.finetune.training_data as data_module
    from mechhi.finetune import micro_batch

    prepared = []
    real = data_module.prepare_samples
    monkeypatch.setattr(data_module, "prepare_samples", lambda *a, **kw: prepared.append(1) or real(*a, **kw))
    data = FinetuneData.read(setup["data"], val_limit=FAST.val_limit)
    every_step = TrainSettings(**{**FAST.__dict__, "eval_every": 1})  # 4 validations
    for name in ("once-a", "once-b"):  # two runs on one FinetuneData, as the experiment does
        finetune(
            _config(setup, setup["root"] / name, train=every_step),
            data=data,
            loaded=(copy.deepcopy(setup["model"]), setup["adapter"]),
            progress=False,
        )
    assert len(prepared) == -(
        -FAST.val_limit // FAST.batch_size
    )  # the val batches, prepared once for both runs
    drawn = {
        int(i)
        for j in range(FAST.max_steps * FAST.grad_accum)
        for i in micro_batch(len(data.train), seed=FAST.seed, index=j, size=FAST.batch_size)
    }
    files = {data.train[i].image_path for i in drawn} | {s.image_path for s in data.val}
    assert (
        data.images.decoded == len(files) == len(data.images)
    )  # each image file decoded once, over both runs


def test_a_partly_traced_store_warns_how_many_samples_the_ranking_rests_on(setup, capsys):
    store = scored_store(setup["root"] / "partial.zarr", 4, samples=5, traced=3)
    finetune(
        _config(setup, setup["root"] / "partial", store=str(store)),
        loaded=(copy.deepcopy(setup["model"]), setup["adapter"]),
        progress=False,
    )
    err = capsys.readouterr().err
    assert "ranking rests on 3 of the store's 5 samples" in err
    meta = json.loads((setup["root"] / "partial" / SELECTION_FILE).read_text())
    assert meta["selection"]["provenance"]["traced_samples"] == 3


def test_early_stopping_stops_and_keeps_the_best(setup):
    bad_lr = TrainSettings(**{**FAST.__dict__, "lr": 5.0, "max_steps": 8, "eval_every": 1, "patience": 2})
    result = finetune(
        _config(setup, setup["root"] / "early", train=bad_lr),
        loaded=(copy.deepcopy(setup["model"]), setup["adapter"]),
        progress=False,
    )
    vals = [v["loss"] for v in result.history.val]
    assert result.history.stopped_early and len(vals) < 8
    assert vals.index(min(vals)) == len(vals) - 3 and result.history.best_loss == min(
        vals
    )  # 2 bad evals after it
    # the saved adapter holds the best weights, not the last ones
    from peft import PeftModel

    from mechhi.finetune import load_split

    model = PeftModel.from_pretrained(copy.deepcopy(setup["model"]), str(result.out))
    val = load_split(setup["data"], "val", FAST.val_limit).samples
    assert validation_loss(model, setup["adapter"], val, batch_size=2) == pytest.approx(
        result.history.best_loss, rel=1e-5
    )
