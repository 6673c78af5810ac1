"""LLaVA stage 1 (`mechhi.pretrained_recipe`) on a tiny random-weight LLaVA: only the
projector learns, the loss falls, and a resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mechhi.finetune.loss import answer_loss
from mechhi.models.llava import LlavaAdapter
from mechhi.pretrained_recipe.projector import (
    LOG_FILE,
    PROJECTOR_FILE,
    ProjectorConfig,
    freeze_all_but_projector,
    learning_rate,
    step_batches,
    train_projector,
)
from mechhi.toyworld.model import vocabulary

WORDS = [*vocabulary(), "This", "is", "a", "an", "of"]
CONFIG = ProjectorConfig(steps=4, batch_size=2, vqa_per_step=1, warmup=1, checkpoint_every=1, lr=1e-2)


def tiny():
    torch.manual_seed(0)
    model, processor = LlavaAdapter.build_tiny(words=WORDS)
    return model, LlavaAdapter(model.config, processor)


def test_a_step_changes_only_the_projector(tmp_path):
    model, adapter = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_projector(model, adapter, ProjectorConfig(**{**CONFIG.__dict__, "steps": 1}), tmp_path, progress=False)
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
    whole, resumed = load_file(tmp_path / "whole" / PROJECTOR_FILE), load_file(tmp_path / "resumed" / PROJECTOR_FILE)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not torch.equal(whole["linear_1.weight"], tiny()[0].model.multi_modal_projector.linear_1.weight)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / LOG_FILE).read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_learning_rate_warms_up_then_decays_to_zero():
    config = ProjectorConfig(steps=11, warmup=1, lr=1.0)
    assert learning_rate(0, config) == 1.0
    assert learning_rate(6, config) == pytest.approx(0.5)  # half way through the cosine
    assert learning_rate(11, config) == pytest.approx(0.0)
