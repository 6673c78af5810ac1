"""LLaVA stage 1 (`mechhi.pretrained_recipe`) on a tiny random-weight LLaVA: only the
projector learns, the loss falls, and a resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mechhi.finetune.loss import answer_loss
from mechhi.models.llava import LlavaAdapter
from mechhi.models.tiny import tiny_llava
from mechhi.models.toy import vocabulary
from mechhi.pretrained_recipe.projector import (
    LOG_FILE,
    PROJECTOR_FILE,
    ProjectorConfig,
    freeze_all_but_projector,
    learning_rate,
    step_batches,
    train_projector,
)

WORDS = [*vocabulary(), "This", "is", "a", "an", "of"]
CONFIG = ProjectorConfig(steps=4, batch_size=2, vqa_per_step=1, warmup=1, checkpoint_every=1, lr=1e-2)


def tiny():
    torch.manual_seed(0)
    model, processor = tiny_llava(words=WORDS)
    return model, LlavaAdapter(model.config, processor)


def test_a_step_changes_only_the_projector(tmp_path):
    model, adapter = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_projector(
        model, adapter, ProjectorConfig(**{**CONFIG.__dict__, "steps": 1}), tmp_path, progress=False
    )
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    projector_keys = {k for k in before if ".multi_modal_projector." in k}
    assert changed == projector_keys and len(projector_keys) == 4  # two linears: weight and bias each
    # what is shipped is that state dict, under the projector's own keys
    shipped = load_file(tmp_path / PROJECTOR_FILE)
    own = model.model.multi_modal_projector.state_dict()
    assert shipped.keys() == own.keys() and all(torch.equal(shipped[k], own[k]) for k in own)


def test_loss_falls_on_a_fixed_batch():
    model, adapter = tiny()
    batch = step_batches(adapter, CONFIG, 0)["caption"]
    optimizer = torch.optim.AdamW(freeze_all_but_projector(model), lr=1e-2)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = answer_loss(model, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(p.grad is None for n, p in model.named_parameters() if "multi_modal_projector" not in n)


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    model, adapter = tiny()
    train_projector(model, adapter, CONFIG, tmp_path / "whole", progress=False)
    model_2, adapter_2 = tiny()
    train_projector(model_2, adapter_2, CONFIG, tmp_path / "resumed", progress=False, stop_after=2)
    model_3, adapter_3 = tiny()  # a fresh process: only the checkpoint carries the run
    train_projector(model_3, adapter_3, CONFIG, tmp_path / "resumed", progress=False)
    whole, resumed = (
        load_file(tmp_path / "whole" / PROJECTOR_FILE),
        load_file(tmp_path / "resumed" / PROJECTOR_FILE),
    )
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not torch.equal(whole["linear_1.weight"], tiny()[0].model.multi_modal_projector.linear_1.weight)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / LOG_FILE).read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_learning_rate_warms_up_then_decays_to_zero():
    config = ProjectorConfig(steps=11, warmup=1, lr=1.0)
    assert learning_rate(0, config) == 1.0
    assert learning_rate(6, config) == pytest.approx(0.5)  # half way through the cosine
    assert learning_rate(11, config) == pytest.approx(0.0)


def _metric(mean: float) -> dict:
    return {"mean": mean, "se": 0.01, "n": 40}


def fake_metrics(steps_done: int) -> dict:
    quality = {
        "caption_token_accuracy": _metric(0.8125),
        "caption_perplexity": _metric(1.9876),
        "vqa_accuracy": _metric(0.6875),
        "vqa_ans_prob": _metric(0.5432),
    }
    untrained = {k: _metric(v) for k, v in zip(quality, (0.1234, 87.65, 0.2468, 0.2501))}
    hi = {
        "best_layer": 7,
        "best_layer_mean_hi": 0.2222,
        "best_head_hi": 0.4567,
        "mean_hi": 0.1111,
        "top4_layers": [7],
    }
    hi_untrained = {**hi, "best_head_hi": 0.0987, "best_layer": 3}
    return {
        "trained": quality,
        "untrained": untrained,
        "head_impact_trained": hi,
        "head_impact_untrained": hi_untrained,
        "text_only": {
            "prompt": "The capital of France is",
            "trained_next_token": " Paris",
            "untrained_next_token": " Paris",
            "max_abs_logit_difference": 0.0,
        },
        "training": {"config": CONFIG.__dict__, "steps_done": steps_done, "steps_planned": 4, "minutes": 3.5},
        "held_out": {"seed": 99991, "images": 40, "hi_images": 8},
        "trained_parameters": 553536,
    }


def test_the_card_command_writes_its_numbers_from_metrics_json(tmp_path):
    from typer.testing import CliRunner

    from mechhi.commands import app

    (tmp_path / "metrics.json").write_text(json.dumps(fake_metrics(steps_done=2)))
    (tmp_path / LOG_FILE).write_text(
        "".join(json.dumps({"step": s, "caption_loss": 3.0 / s}) + "\n" for s in (1, 2))
    )
    result = CliRunner().invoke(
        app, ["zoo", "card", "dinov2-smollm2", "--projector-dir", str(tmp_path), "--from-metrics"]
    )
    assert result.exit_code == 0, result.output
    card = (tmp_path / "README.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| caption answer-token accuracy"))
    assert "0.812 ± 0.010" in row and "0.123 ± 0.010" in row
    assert "| best head HI | 0.457 | 0.099 |" in card
    assert "' Paris'" in card and "cut short**: 2 of 4" in card
    assert (tmp_path / "training_curve.png").stat().st_size > 1000
    assert json.loads((tmp_path / "metrics.json").read_text()) == fake_metrics(steps_done=2)
