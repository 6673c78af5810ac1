"""A `LlavaForConditionalGeneration` put together from a vision tower, a causal language
model and a fresh 2-layer GELU projector, with the processor that feeds it.

LLaVA's layout, as mechhi's LLaVA adapter reads it: the CLIP-style image processor
resizes the short side to the crop and centre-crops it; the tower cuts the crop into
patches plus a CLS token, which ``vision_feature_select_strategy="default"`` drops; each
patch becomes one ``<image>`` token (added to the tokenizer after its vocabulary, with
the mean of the existing embedding rows, so an untrained build starts from an
"average" token rather than noise). The chat template is the language model's ChatML
with an ``<image>`` line where the image goes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mechhi.models.zoo.catalog import Recipe


def chat_template(turn_start: str, turn_end: str, assistant: str) -> str:
    """A chat template with these turn markers; content given as a string or as a list
    of image/text parts, an ``<image>`` line where the image goes."""
    return (
        f"{{% for m in messages %}}{turn_start}"
        f"{{{{ '{assistant}' if m['role'] == 'assistant' else m['role'] }}}}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
        f"{turn_end}\n{{% endfor %}}{{% if add_generation_prompt %}}{turn_start}{assistant}\n{{% endif %}}"
    )


# Each language model's own turn markers: SmolLM2's ChatML, Gemma's turns (the tokenizer
# adds Gemma's <bos> itself, so the template does not).
CHAT_TEMPLATES = {
    "chatml": chat_template("<|im_start|>", "<|im_end|>", "assistant"),
    "gemma": chat_template("<start_of_turn>", "<end_of_turn>", "model"),
}


def add_image_token(tokenizer: Any, token: str) -> tuple[int, bool]:
    """Add ``token`` as a special token after the vocabulary (idempotent): (its id, whether
    it was added now)."""
    if token in tokenizer.get_vocab():
        return int(tokenizer.convert_tokens_to_ids(token)), False
    tokenizer.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
    return int(tokenizer.convert_tokens_to_ids(token)), True


def image_processor(recipe: Recipe) -> Any:
    from transformers import CLIPImageProcessor

    crop = recipe.crop_size
    return CLIPImageProcessor(
        size={"shortest_edge": crop},
        crop_size={"height": crop, "width": crop},
        image_mean=list(recipe.image_mean),
        image_std=list(recipe.image_std),
        resample=3,  # bicubic, as DINOv2
        do_convert_rgb=True,
    )


def assemble(
    recipe: Recipe, vision: Any, text: Any, tokenizer: Any, projector: dict | None = None
) -> tuple[Any, Any]:
    """(LlavaForConditionalGeneration in eval mode, LlavaProcessor).

    ``projector``: a state dict for ``multi_modal_projector`` (a trained one); without it
    the projector is initialised from ``recipe.seed`` (deterministic).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    if getattr(text.config, "final_logit_softcapping", None) is not None:
        raise ValueError(
            f"{recipe.name}: the language model softcaps its logits, which LLaVA's head does not"
        )
    vocabulary = len(tokenizer)
    image_token_id, added = add_image_token(tokenizer, recipe.image_token)
    processor = LlavaProcessor(
        image_processor=image_processor(recipe),
        tokenizer=tokenizer,
        patch_size=recipe.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATES[recipe.chat_format],
        image_token=recipe.image_token,
    )
    text_config = text.config.to_dict()
    text_config["vocab_size"] = len(tokenizer)
    config = LlavaConfig(
        vision_config=vision.config.to_dict(),
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=recipe.image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=recipe.vision_feature_layer,
        projector_hidden_act=recipe.projector_act,
        tie_word_embeddings=bool(getattr(text.config, "tie_word_embeddings", False)),
    )
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = text.model
    model.lm_head = text.lm_head
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embeddings = model.get_input_embeddings().weight
    if added:  # a token the language model already had keeps its row
        with torch.no_grad():
            embeddings[image_token_id] = embeddings[:vocabulary].mean(0)
    model.model.multi_modal_projector = fresh_projector(config, recipe.seed)
    if projector is not None:
        model.model.multi_modal_projector.load_state_dict(projector, strict=True)
    model.tie_weights()
    return model.float().eval(), processor


def fresh_projector(config: Any, seed: int) -> torch.nn.Module:
    """LLaVA's projector (linear, GELU, linear) under PyTorch's default init, seeded."""
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        projector = LlavaMultiModalProjector(config)
        for module in projector.modules():
            if isinstance(module, torch.nn.Linear):
                module.reset_parameters()
    finally:
        torch.random.set_rng_state(generator_state)
    return projector


def save(model: Any, processor: Any, directory: Path) -> None:
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
