"""`mechhi toy card`: the toy model measured on held-out scenes (caption and VQA quality,
Head Impact against the same architecture at random initialisation) and its model card."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from mechhi.data.format import ImageRecord
from mechhi.data.synthetic import COLOURS, SHAPES, WorldConfig, build_synthetic, render_one
from mechhi.evaluate.metrics import Metric, answer_predictions, closed_vqa, perplexity_of, scores_of
from mechhi.models import VLMAdapter
from mechhi.models.loading import load
from mechhi.models.toy import HELD_OUT_SEED, TOY_DIR, VQA_TARGET, ToyConfig, build
from mechhi.toyworld.curriculum import caption_of, lures, vqa_item
from mechhi.trace.trace_dataset import TraceConfig, trace_dataset
from probes.head_impact import layer_ranking, score_store


def held_out(n_images: int, config: ToyConfig) -> list[tuple[ImageRecord, object]]:
    world = WorldConfig(image_size=config.image_size)
    return [render_one(i, seed=HELD_OUT_SEED, config=world) for i in range(n_images)]


def measure(
    model: torch.nn.Module, adapter: VLMAdapter, *, n_images: int = 200, config: ToyConfig = ToyConfig()
) -> dict[str, dict[str, float]]:
    """Caption token accuracy and perplexity, VQA accuracy and AnsProb on held-out scenes."""
    scenes = held_out(n_images, config)
    images = [im for _, im in scenes]
    predictions = list(
        answer_predictions(model, adapter, images, [caption_of(r) for r, _ in scenes], batch_size=16)
    )
    nll, accuracy = scores_of(predictions)
    rng = np.random.default_rng(HELD_OUT_SEED)
    items = [vqa_item(r, im, rng) for r, im in scenes]
    vqa = closed_vqa(model, adapter, items, batch_size=16)
    # The questions colour alone cannot answer: a distractor has a present object's colour.
    world = WorldConfig(image_size=config.image_size)
    lured = [
        item
        for item, (record, _) in zip(items, scenes, strict=True)
        if set(item.options) & set(lures(record, world)["same colour"])
    ]
    return {
        "caption_token_accuracy": Metric.of(accuracy).as_dict(),
        "caption_perplexity": perplexity_of(nll).as_dict(),
        "vqa_accuracy": vqa["accuracy"].as_dict(),
        "vqa_ans_prob": vqa["ans_prob"].as_dict(),
        "vqa_accuracy_same_colour_lure": closed_vqa(model, adapter, lured, batch_size=16)[
            "accuracy"
        ].as_dict(),
        "vqa_questions_same_colour_lure": len(lured),
        "caption_word_accuracy": word_accuracy(adapter, predictions),
    }


def word_accuracy(
    adapter: VLMAdapter, predictions: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, float]:
    """Teacher-forced caption accuracy split by word kind, from `answer_predictions`: a
    colour is visible in any one token of an object, a shape only in how its tokens fit
    together, so the two tell apart what the vision pathway has learnt."""
    hits: dict[str, list[bool]] = {"colour": [], "shape": [], "other": []}
    for predicted, target in predictions:
        for word, hit in zip(
            adapter.tokenizer.convert_ids_to_tokens(target.tolist()),
            (predicted.argmax(-1) == target).tolist(),
            strict=True,
        ):
            hits["colour" if word in COLOURS else "shape" if word in SHAPES else "other"].append(hit)
    return {kind: float(np.mean(h)) for kind, h in hits.items() if h}


def head_impact_summary(
    model: torch.nn.Module, adapter: VLMAdapter, workdir: Path, *, n_images: int = 30, name: str = "model"
) -> dict[str, float]:
    """Trace held-out scenes and summarise Head Impact: best layer, best head, overall mean."""
    data = workdir / "held-out"
    if not (data / "annotations.jsonl").exists():
        build_synthetic(data, n_images=n_images, seed=HELD_OUT_SEED, splits={"trace": 1.0}, progress=False)
    store = trace_dataset(
        TraceConfig(dataset=str(data), store=str(workdir / f"{name}.zarr"), batch_size=8),
        progress=False,
        loaded=(model, adapter),
    )
    scores = score_store(store)
    ranking = layer_ranking(scores)
    hi = scores.head_impact
    return {
        "best_layer": int(ranking.layer[0]),
        "best_layer_mean_hi": float(ranking[0]),
        "best_head_hi": float(hi.max()),
        "mean_hi": float(hi.mean()),
        "top4_layers": [int(x) for x in ranking.layer[:4]],
    }


def card_metrics(out_dir: Path = TOY_DIR, *, n_images: int = 200, hi_images: int = 30) -> dict:
    """Everything the model card reports, measured now on held-out scenes."""
    import tempfile

    config = ToyConfig.read(Path(out_dir) / "toy_config.json")
    model, adapter = load(out_dir, device="cpu", dtype="float32")
    random_model, random_adapter = build(config)
    log = [json.loads(line) for line in (Path(out_dir) / "training_log.jsonl").read_text().splitlines()]

    def last(key: str) -> float | None:  # the phases log different losses; a short run may lack some
        return next((entry[key] for entry in reversed(log) if key in entry), None)

    with tempfile.TemporaryDirectory() as tmp:
        metrics = {
            "trained": measure(model, adapter, n_images=n_images, config=config),
            "random_init": measure(random_model.eval(), random_adapter, n_images=n_images, config=config),
            "head_impact_trained": head_impact_summary(
                model, adapter, Path(tmp), n_images=hi_images, name="trained"
            ),
            "head_impact_random": head_impact_summary(
                random_model, random_adapter, Path(tmp), n_images=hi_images, name="random"
            ),
        }
    metrics["training"] = {
        "config": asdict(config),
        "minutes": round(log[-1]["seconds"] / 60, 1),
        "final_caption_loss": last("caption_loss"),
        "final_vqa_loss": last("vqa_loss"),
    }
    metrics["parameters"] = sum(p.numel() for p in model.parameters())
    metrics["held_out"] = {"seed": HELD_OUT_SEED, "images": n_images, "hi_images": hi_images}
    return metrics


def write_card(metrics: dict, out_dir: Path = TOY_DIR) -> Path:
    """The model card (README.md) with the measured numbers, and the same as JSON."""
    (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    t, r = metrics["trained"], metrics["random_init"]
    ht, hr = metrics["head_impact_trained"], metrics["head_impact_random"]

    tw, rw = t["caption_word_accuracy"], r["caption_word_accuracy"]
    c = metrics["training"]["config"]
    mix = f"{c['batch_size'] - c['vqa_per_step']} captioned + {c['vqa_per_step']} VQA per step"
    if c["caption_only_steps"]:
        mix = f"captioning only for the first {c['caption_only_steps']} steps, then {mix}"
    limitations = ""
    if t["vqa_accuracy"]["mean"] < VQA_TARGET:
        limitations = f"""## Known limitations

Closed-ended VQA accuracy is {t["vqa_accuracy"]["mean"]:.2f}, below the {VQA_TARGET:.0%} target. The misses
concentrate on questions where a distractor has the colour of an object in the image
(accuracy {t["vqa_accuracy_same_colour_lure"]["mean"]:.2f} there): \
telling shapes apart is what the 30-minute CPU budget
leaves least trained.

"""

    def fmt(m: dict, digits: int = 3) -> str:
        return f"{m['mean']:.{digits}f} ± {m['se']:.{digits}f}"

    text = f"""# toy-qwen2vl: the bundled toy model of mechhi

A {metrics["parameters"] / 1e6:.2f} M-parameter model of the real transformers class
`Qwen2VLForConditionalGeneration` (12 decoder layers, hidden 128, 4 heads with 2 KV heads,
4-layer vision tower, word-level tokenizer), trained from scratch by `mechhi toy train` on
scenes of the synthetic world (`mechhi/data/synthetic.py`): 1-3 coloured shapes on varied
backgrounds at 224 px (8 x 8 visual tokens).

Tasks (the paper's prompts): captioning, "What is this photo?" -> "This is a photo of a
red circle and a blue square." (objects left to right), and closed-ended VQA with four
options -> "B.". Training, seeded, never the same scene twice, {metrics["training"]["minutes"]} minutes
on 2 CPU cores (`training_log.jsonl`):

1. vision phase, {c["vision_steps"]} steps of {c["vision_batch_size"]} scenes: the vision tower alone, with a
   linear probe that classifies each object's shape and colour from its mask-weighted
   mean visual token (the probe is dropped afterwards; the shipped model is a plain
   Qwen2-VL);
2. language phase, {c["steps"]} steps of {c["batch_size"]} scenes: {mix}, the probe loss kept on.
   Training questions draw each distractor, with a probability rising from 0 to {c["lure_share"]} over
   language steps {c["lure_ramp"][0]}-{c["lure_ramp"][1]}, from the lures of the scene \
(a present object with its
   shape or its colour changed), so that colour alone cannot answer them; evaluation asks
   the world's own questions (distractors at random). A second probe, also dropped
   afterwards, reads decoder layer {c["option_probe_layer"]} at each option's last word and is trained to say
   whether that option is in the image. In two development runs otherwise alike (24
   questions per step; their logs are not shipped), VQA left its chance plateau after about
   190 language steps with this probe and after about 450 without it.

## Quality on held-out scenes (world seed {metrics["held_out"]["seed"]}, \
{metrics["held_out"]["images"]} images; mean ± SE)

| metric | trained | random init |
|---|---|---|
| caption answer-token accuracy | {fmt(t["caption_token_accuracy"])} | {fmt(r["caption_token_accuracy"])} |
| caption perplexity (answer tokens) | {fmt(t["caption_perplexity"], 2)} | {fmt(r["caption_perplexity"], 2)} |
| closed-ended VQA accuracy | {fmt(t["vqa_accuracy"])} | {fmt(r["vqa_accuracy"])} |
| VQA accuracy, questions with a same-colour lure ({t["vqa_questions_same_colour_lure"]}) \
| {fmt(t["vqa_accuracy_same_colour_lure"])} \
| {fmt(r["vqa_accuracy_same_colour_lure"])} |
| VQA AnsProb | {fmt(t["vqa_ans_prob"])} | {fmt(r["vqa_ans_prob"])} |
| caption colour-word accuracy | {tw["colour"]:.3f} | {rw["colour"]:.3f} |
| caption shape-word accuracy (chance 0.25) | {tw["shape"]:.3f} | {rw["shape"]:.3f} |

## Head Impact ({metrics["held_out"]["hi_images"]} held-out images, all their objects)

| | trained | random init |
|---|---|---|
| best layer (mean HI over heads) | {ht["best_layer"]} ({ht["best_layer_mean_hi"]:.3f}) \
| {hr["best_layer"]} ({hr["best_layer_mean_hi"]:.3f}) |
| best head HI | {ht["best_head_hi"]:.3f} | {hr["best_head_hi"]:.3f} |
| mean HI over all heads | {ht["mean_hi"]:.3f} | {hr["mean_hi"]:.3f} |
| top-4 layers | {ht["top4_layers"]} | {hr["top4_layers"]} |

{limitations}## How it got here

Earlier versions of this model, kept in git for comparison: trained on the language loss
alone (commit f7aa657), it never learnt shapes and answered VQA at chance; with the
vision phase but on the world's own questions (commit c65e1c2), it reached 0.70 VQA
accuracy by colour alone: on this card's questions, 0.41 on the 100 with a same-colour
lure and 1.00 on the other 100 (`mechhi toy card --model` on that commit's weights). The
lures and the option probe above are the two changes since, with smaller steps (20 scenes
instead of 32) so that the same 700 steps fit the budget with room.

Numbers written by `mechhi toy card` (also in `metrics.json`).
"""
    path = Path(out_dir) / "README.md"
    path.write_text(text)
    return path
