"""End-to-end tests of the grounding builder on tiny random-weight Florence-2 and SAM2.

Both are transformers' real classes with tiny configs; the Florence-2 processor gets an
offline byte-level BPE tokenizer with Florence's special tokens (``<loc_0>``..``<loc_999>``,
``<image>``). Random weights generate garbage, so most tests script Florence's
``generate`` output (a known token sequence per prompt) while the processor's real
post-processing parses it and the real SAM2 forward segments the boxes. Expected boxes,
masks and scores are recomputed here from first principles (Florence's bin centres,
SAM2's raw output upsampled with torch), not through the code under test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mechhi.data import DatasetError, load_dataset
from mechhi.data.grounding import GroundingConfig, build_from_images, load_captions, select_objects

CAPTION = "a red circle and a blue square"  # what the scripted Florence-2 captions every image
SIZES = {"a.png": (48, 40), "b.png": (48, 56), "c.png": (40, 32)}  # name -> (width, height)


# ----------------------------------------------------------------------------- tiny models


def tiny_florence():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        PreTrainedTokenizerFast,
    )

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["a red circle and a blue square", "a green star", "Locate the phrases"]
    backend.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    locs = [f"<loc_{i}>" for i in range(1000)]
    tok.add_special_tokens({"additional_special_tokens": ["<od>", "</od>", *locs]})
    # 32 px images, vision strides 4 and 2 -> 4x4 grid + 1 pooled token = 17 image tokens
    image_processor = CLIPImageProcessor(
        size={"height": 32, "width": 32}, do_center_crop=False, image_seq_length=17
    )
    processor = Florence2Processor(
        image_processor=image_processor,
        tokenizer=tok,
        post_processor_config={
            "pure_text": {},
            "phrase_grounding": {"banned_grounding_tokens": ["the image"]},
        },
    )
    text = dict(
        model_type="bart",
        vocab_size=len(tok),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        decoder_start_token_id=tok.eos_token_id,
    )
    vision = dict(
        depths=[1, 1],
        patch_size=[7, 3],
        patch_stride=[4, 2],
        patch_padding=[3, 1],
        patch_prenorm=[False, True],
        embed_dim=[16, 32],
        num_heads=[1, 2],
        num_groups=[1, 2],
        window_size=2,
        projection_dim=32,
        drop_path_rate=0.0,
    )
    torch.manual_seed(0)
    config = Florence2Config(text_config=text, vision_config=vision, image_token_id=tok.image_token_id)
    return Florence2ForConditionalGeneration(config).eval(), processor


def tiny_sam():
    from transformers import Sam2Config, Sam2Model, Sam2Processor
    from transformers.models.sam2 import Sam2ImageProcessor

    backbone = dict(
        model_type="sam2_hiera_det_model",
        hidden_size=8,
        image_size=[64, 64],
        window_positional_embedding_background_size=[2, 2],
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[8, 16, 32, 64],
        num_attention_heads_per_stage=[1, 1, 1, 1],
        window_size_per_stage=[4, 4, 2, 2],
        global_attention_blocks=[3],
    )
    vision = dict(
        model_type="sam2_vision_model",
        backbone_config=backbone,
        backbone_channel_list=[64, 32, 16, 8],
        backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]],
        fpn_hidden_size=16,
    )
    config = Sam2Config(
        vision_config=vision,
        prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(
            hidden_size=16, mlp_dim=32, num_hidden_layers=1, num_attention_heads=2, iou_head_hidden_dim=16
        ),
    )
    torch.manual_seed(1)
    processor = Sam2Processor(
        image_processor=Sam2ImageProcessor(
            size={"height": 64, "width": 64}, mask_size={"height": 16, "width": 16}
        )
    )
    return Sam2Model(config).eval(), processor


@pytest.fixture(scope="module")
def models():
    return tiny_florence(), tiny_sam()


class ScriptedGenerate:
    """Stands in for Florence's ``generate``: answers each prompt with a scripted string,
    encoded as the real model would emit it (``</s><s>answer</s>`` then padding)."""

    def __init__(self, processor, caption: str, grounding: dict[str, str]) -> None:
        self.tok = processor.tokenizer
        self.caption, self.grounding = caption, grounding
        self.prompts: list[str] = []

    def answer(self, prompt: str) -> str:
        if prompt.startswith("Locate the phrases in the caption:"):
            return self.grounding.get(prompt.split(":", 1)[1].strip(), "nothing grounded here")
        return self.caption

    def __call__(self, input_ids, **kwargs) -> torch.Tensor:
        prompts = self.tok.batch_decode(input_ids, skip_special_tokens=True)
        self.prompts += prompts
        rows = [
            [self.tok.eos_token_id, self.tok.bos_token_id]
            + self.tok(self.answer(p), add_special_tokens=False).input_ids
            + [self.tok.eos_token_id]
            for p in prompts
        ]
        width = max(map(len, rows))
        return torch.tensor([r + [self.tok.pad_token_id] * (width - len(r)) for r in rows])


def loc(*bins: int) -> str:
    return "".join(f"<loc_{b}>" for b in bins)


def florence_box(bins, width, height):
    """Florence-2's box for 4 location bins: centre of each of 1000 bins, truncated to int."""
    scale = (width, height, width, height)
    return [math.floor((b + 0.5) * s / 1000) for b, s in zip(bins, scale)]


@pytest.fixture
def images_dir(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in SIZES.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def scripted(models, monkeypatch, grounding, caption=None):
    (florence_model, florence_proc), _ = models
    fake = ScriptedGenerate(florence_proc, caption or CAPTION, grounding)
    monkeypatch.setattr(florence_model, "generate", fake)
    return fake


def capture(module, *, kwargs=False):
    seen = []
    if kwargs:
        handle = module.register_forward_hook(lambda m, a, kw, out: seen.append(kw), with_kwargs=True)
    else:
        handle = module.register_forward_hook(lambda m, a, out: seen.append(out))
    return seen, handle


CONFIG = dict(min_score=0.0, batch_size=8, num_beams=1, max_new_tokens=8)
A_BOXES = {"a red circle": (100, 200, 600, 900), "a blue square": (500, 50, 990, 400)}


# ----------------------------------------------------------------------------- end to end


def test_phrases_boxes_and_masks_reach_the_dataset(models, images_dir, tmp_path, monkeypatch):
    grounding = {CAPTION: "".join(p + loc(*b) for p, b in A_BOXES.items())}
    fake = scripted(models, monkeypatch, grounding)
    sam_model = models[1][0]
    prompts_seen, h1 = capture(sam_model.prompt_encoder, kwargs=True)
    outputs_seen, h2 = capture(sam_model)
    try:
        report = build_from_images(
            images_dir,
            tmp_path / "out",
            config=GroundingConfig(**CONFIG),
            limit=2,
            progress=False,
            florence=models[0],
            sam=models[1],
        )
    finally:
        h1.remove(), h2.remove()

    # a.png: caption -> two phrases; b.png: same caption, same answer
    assert report.images_processed == 2 and report.captions_generated == 2
    assert report.objects_kept == 4 and report.dropped == {
        "no_phrase": 0,
        "low_score": 0,
        "empty_mask": 0,
        "duplicate_phrase": 0,
    }
    # <MORE_DETAILED_CAPTION> by default, not <CAPTION>
    assert sum(p.startswith("What does the image describe") for p in fake.prompts) == 0
    assert sum(p.startswith("Describe with a paragraph") for p in fake.prompts) == 2

    # the boxes SAM2 received, in its 64x64 input frame (one SAM2 call for both images)
    (kw,) = prompts_seen
    got = kw["input_boxes"]  # (2 images, 2 boxes, 4)
    for row, name in enumerate(["a.png", "b.png"]):
        w, h = SIZES[name]
        want = [florence_box(b, w, h) for b in A_BOXES.values()]
        want = torch.tensor(want, dtype=torch.float32) * torch.tensor([64 / w, 64 / h, 64 / w, 64 / h])
        torch.testing.assert_close(got[row], want)

    ds = load_dataset(tmp_path / "out")
    assert [s.description for s in ds] == ["a red circle", "a blue square"] * 2
    (out,) = outputs_seen
    for s in ds:
        row, j = int(s.image_id == "b"), int(s.description == "a blue square")
        w, h = SIZES[f"{s.image_id}.png"]
        assert s.record.caption == CAPTION
        assert s.obj.attributes["box"] == florence_box(list(A_BOXES.values())[j], w, h)
        # SAM2's single-mask output, upsampled to the image by bilinear interpolation, > 0
        logits = out.pred_masks[row, j, 0][None, None]
        want = F.interpolate(logits, (h, w), mode="bilinear", align_corners=False)[0, 0] > 0
        assert s.mask().shape == (h, w)
        np.testing.assert_array_equal(s.mask(), want.numpy())
        assert s.obj.attributes["score"] == pytest.approx(out.iou_scores[row, j, 0].item(), abs=1e-4)


def test_multimask_keeps_the_best_of_three(models, images_dir, tmp_path, monkeypatch):
    scripted(models, monkeypatch, {CAPTION: "a red circle" + loc(100, 200, 600, 900)})
    outputs_seen, handle = capture(models[1][0])
    config = GroundingConfig(**CONFIG, multimask_output=True)
    try:
        build_from_images(
            images_dir,
            tmp_path / "out",
            config=config,
            limit=1,
            progress=False,
            florence=models[0],
            sam=models[1],
        )
    finally:
        handle.remove()
    (out,) = outputs_seen
    assert out.iou_scores.shape == (1, 1, 3)
    k = int(out.iou_scores[0, 0].argmax())
    (s,) = load_dataset(tmp_path / "out")
    want = F.interpolate(out.pred_masks[0, 0, k][None, None], (40, 48), mode="bilinear", align_corners=False)
    np.testing.assert_array_equal(s.mask(), (want[0, 0] > 0).numpy())
    assert s.obj.attributes["score"] == pytest.approx(out.iou_scores[0, 0].max().item(), abs=1e-4)


def test_score_threshold_filters(models, images_dir, tmp_path, monkeypatch):
    grounding = {CAPTION: "".join(p + loc(*b) for p, b in A_BOXES.items())}
    scripted(models, monkeypatch, grounding)
    kw = dict(limit=2, progress=False, florence=models[0], sam=models[1])
    keep = build_from_images(images_dir, tmp_path / "keep", config=GroundingConfig(**CONFIG), **kw)
    strict = GroundingConfig(**{**CONFIG, "min_score": 1.01})
    drop = build_from_images(images_dir, tmp_path / "drop", config=strict, **kw)
    assert keep.objects_kept == 4 and keep.dropped["low_score"] == 0
    assert drop.objects_kept == 0 and drop.dropped["low_score"] == 4
    assert str(drop).startswith(
        "2 images processed (0 already done), 0 objects kept; dropped: no_phrase=0, low_score=4"
    )
    empty = load_dataset(tmp_path / "drop")
    assert len(empty.records) == 2 and len(empty) == 0  # images written without objects


def test_duplicates_no_phrase_and_user_captions(models, images_dir, tmp_path, monkeypatch):
    grounding = {
        CAPTION: "a red circle" + loc(100, 200, 600, 900) + "a red circle" + loc(0, 0, 400, 400),
        "a green star": "a green star" + loc(10, 10, 900, 900),
    }
    fake = scripted(models, monkeypatch, grounding)
    outputs_seen, handle = capture(models[1][0])
    try:
        report = build_from_images(
            images_dir,
            tmp_path / "out",
            config=GroundingConfig(**CONFIG),
            progress=False,
            captions={"b.png": "a green star", "c": "a purple cloud"},
            florence=models[0],
            sam=models[1],
        )
    finally:
        handle.remove()
    assert report.captions_given == 2 and report.captions_generated == 1
    assert report.dropped["duplicate_phrase"] == 1 and report.dropped["no_phrase"] == 1
    assert report.objects_kept == 2
    assert sum(p.startswith("Describe") for p in fake.prompts) == 1  # only a.png needed a caption
    assert "Locate the phrases in the caption: a purple cloud" in fake.prompts

    ds = load_dataset(tmp_path / "out")
    by_id = {r.image_id: r for r in ds.records}
    assert by_id["b"].caption == "a green star" and by_id["c"].objects == ()
    (red,) = by_id["a"].objects
    (out,) = outputs_seen  # images a, b in one SAM2 call (c has no box)
    assert red.attributes["score"] == pytest.approx(out.iou_scores[0, :, 0].max().item(), abs=1e-4)


def test_resume_skips_done_images(models, images_dir, tmp_path, monkeypatch):
    fake = scripted(models, monkeypatch, {CAPTION: "a red circle" + loc(1, 2, 500, 600)})
    kw = dict(config=GroundingConfig(**CONFIG), progress=False, florence=models[0], sam=models[1])
    first = build_from_images(images_dir, tmp_path / "out", limit=2, **kw)
    assert first.images_processed == 2 and len(fake.prompts) == 4  # caption + grounding per image
    second = build_from_images(images_dir, tmp_path / "out", **kw)
    assert (second.images_found, second.images_skipped, second.images_processed) == (3, 2, 1)
    assert len(fake.prompts) == 6  # only c.png was run
    lines = (tmp_path / "out" / "annotations.jsonl").read_text().splitlines()
    assert [json.loads(line)["image_id"] for line in lines] == ["a", "b", "c"]
    again = build_from_images(images_dir, tmp_path / "out", overwrite=True, **kw)
    assert again.images_processed == 3 and len(load_dataset(tmp_path / "out").records) == 3


def test_real_generate_runs_end_to_end(models, images_dir, tmp_path):
    """Unscripted: random weights produce garbage text, which must parse without error."""
    report = build_from_images(
        images_dir,
        tmp_path / "out",
        config=GroundingConfig(**CONFIG),
        limit=2,
        progress=False,
        florence=models[0],
        sam=models[1],
    )
    assert report.images_processed == 2
    ds = load_dataset(tmp_path / "out")
    assert len(ds.records) == 2 and len(ds) == report.objects_kept


# ----------------------------------------------------------------------------- pieces


def test_select_objects_by_hand():
    masks = np.zeros((5, 4, 4), bool)
    masks[[0, 1, 2, 4], 1, 1] = True  # object 3 has an empty mask
    phrases = ["A dog", "a cat", "a  dog", "a bird", "a dog"]
    scores = np.array([0.90, 0.50, 0.95, 0.99, 0.80])
    boxes = [[0, 0, 1, 1]] * 5
    objects, dropped = select_objects(phrases, boxes, masks, scores, min_score=0.85)
    # cat: low score; bird: empty; "a dog" x3: 0.80 low, 0.90 loses to 0.95
    assert dropped == {"no_phrase": 0, "low_score": 2, "empty_mask": 1, "duplicate_phrase": 1}
    assert [(o.object_id, o.description, o.attributes["score"]) for o in objects] == [("0", "a  dog", 0.95)]


def test_models_load_from_local_directories(models, images_dir, tmp_path):
    (florence_model, florence_proc), (sam_model, sam_proc) = models
    florence_model.save_pretrained(tmp_path / "florence")
    florence_proc.save_pretrained(tmp_path / "florence")
    sam_model.save_pretrained(tmp_path / "sam")
    sam_proc.save_pretrained(tmp_path / "sam")
    local = dict(florence=str(tmp_path / "florence"), sam=str(tmp_path / "sam"), device="cpu")
    config = GroundingConfig(**CONFIG, **local)
    report = build_from_images(images_dir, tmp_path / "out", config=config, limit=1, progress=False)
    assert report.images_processed == 1 and len(load_dataset(tmp_path / "out").records) == 1


def test_too_long_caption_names_the_image(models, images_dir, tmp_path):
    message = r"b\.png: Florence-2 prompt is \d+ tokens .* more than the model's 128"
    with pytest.raises(DatasetError, match=message):
        build_from_images(
            images_dir,
            tmp_path / "out",
            config=GroundingConfig(**CONFIG),
            progress=False,
            captions={"b.png": "a red circle " * 40},
            florence=models[0],
            sam=models[1],
        )


def test_missing_model_fails_with_a_clear_message(models, images_dir, tmp_path):
    config = GroundingConfig(**CONFIG, florence=str(tmp_path / "no-such-florence"))
    with pytest.raises(DatasetError, match="cannot load Florence-2 from .*no-such-florence.*--florence DIR"):
        build_from_images(images_dir, tmp_path / "out", config=config, progress=False, sam=models[1])


def test_bad_inputs(tmp_path):
    with pytest.raises(DatasetError, match="caption_task"):
        GroundingConfig(caption_task="<OD>")
    with pytest.raises(DatasetError, match="does not exist"):
        build_from_images(tmp_path / "nothing", tmp_path / "out", progress=False)
    (tmp_path / "c.json").write_text(json.dumps({"a.png": 3}))
    with pytest.raises(DatasetError, match="'a.png' is not a string"):
        load_captions(tmp_path / "c.json")
    (tmp_path / "c.jsonl").write_text('{"file": "a.png", "caption": "a cat"}\n')
    assert load_captions(tmp_path / "c.jsonl") == {"a.png": "a cat"}
