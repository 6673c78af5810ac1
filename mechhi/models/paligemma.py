"""PaliGemma and PaliGemma 2: one fixed-size SigLIP image, prefix-LM attention.

The processor resizes every image to one square (``size`` height x width, aspect
ratio *not* kept, no crop), cuts it into ``patch_size`` patches and puts
``image_seq_length`` ``<image>`` tokens first in the sequence, row-major over the patch
grid (16x16 at 224 px, 32x32 at 448 px). The grid therefore spans the whole original
image box.

There is no chat template. The sequence is::

    <image> x N  <bos>  prefix  \\n | suffix  <eos>
    <----- token_type_ids 0 ------> | <--- 1 --->

The prefix (image + task prompt) attends bidirectionally, the suffix causally; the
model builds that mask from ``token_type_ids``. The description goes in the suffix, so
its rows are causal like any generated answer. PaliGemma 1 has a Gemma decoder,
PaliGemma 2 a Gemma 2 decoder (attention-logit softcap, ``query_pre_attn_scalar``
scaling, sliding window on alternate layers, final-logit softcap); the tracer reads all
of that from the attention call's keywords, so one adapter serves both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


from ._common import AdapterError, PromptTemplate, RenderedPrompt, VisualView, VLMAdapter
from ._tokenizer import word_level_tokenizer

SPECIAL_TOKENS = ["<bos>", "<eos>", "<image>"]
SEPARATOR = "\n"  # the processor ends the prefix with it; Gemma's vocabulary has it as a token

# The paper's Appendix, PaliGemma format: the task prefix ("en" = in English) is the
# user turn, the answer alone is the suffix. ``{options}`` is the caller's
# "A) ... B) ... C) ... D) ..." line.
PALIGEMMA_TEMPLATES: dict[str, PromptTemplate] = {
    "caption": PromptTemplate("describe en", "{answer}"),
    "vqa": PromptTemplate("answer en\n{options}", "{answer}"),
}


class PaliGemmaAdapter(VLMAdapter):
    family = "paligemma"
    model_types = ("paligemma",)  # PaliGemma 2 checkpoints keep this model_type
    templates = PALIGEMMA_TEMPLATES
    variable_image_size = False
    # The model numbers positions 1..T whatever the padding, so right padding gives every
    # sample the positions it has alone.
    padding_side = "right"
    tiny_cases = {
        "gemma": {"kv_heads": 1},  # PaliGemma 1 3B is multi-query (8 heads, 1 kv head)
        "gemma-mha": {"kv_heads": 4},
        # Gemma 2 has no SDPA path (softcap): by default its decoder falls back to eager
        # while the top config still says "sdpa", and set_attn_implementation("sdpa")
        # then raises. Asking for eager up front, as HF's own error message advises,
        # keeps the config consistent.
        "gemma2": {"gemma2": True, "kv_heads": 2, "init_std": 0.1, "attn_implementation": "eager"},
    }

    # -- prompts ----------------------------------------------------------------------
    def render(self, template: str, answer: str, **fields: str) -> RenderedPrompt:
        """Prefix/suffix for the processor, and the full text the tokenizer will see.

        ``processor_kwargs`` are the processor's own ``text`` (the prefix, with its
        ``<image>`` placeholder) and ``suffix``; ``text`` rebuilds what the processor
        makes of them (bos after the image, the separator, eos after the suffix) so that
        the answer is tokenized in context.
        """
        if template not in self.templates:
            raise AdapterError(f"paligemma: unknown template {template!r}; known: {list(self.templates)}")
        tpl = self.templates[template]
        prefix = tpl.user.format(**fields)
        before, answer, after = tpl.assistant_parts(answer)
        image, bos, eos = self.processor.image_token, self.tokenizer.bos_token, self.tokenizer.eos_token
        head = f"{image}{bos}{prefix}{SEPARATOR}{before}"
        text = f"{head}{answer}{after}{eos}"
        return RenderedPrompt(
            text=text,
            answer_span=(len(head), len(head) + len(answer)),
            processor_kwargs={"text": f"{image}{prefix}", "suffix": f"{before}{answer}{after}"},
        )

    # -- layout -----------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the patch grid the processor's resize produces."""
        image_processor = self.processor.image_processor
        if getattr(image_processor, "do_center_crop", False):
            raise AdapterError("paligemma: the image processor crops; the token grid misses image parts")
        size = image_processor.size  # a SizeDict in 5.x, a plain dict in saved configs
        height, width = (size.get("height"), size.get("width"))
        if height is None or width is None:
            raise AdapterError(f"paligemma: the image processor resizes to {size!r}, not to one fixed size")
        patch = int(self.config.vision_config.patch_size)
        rows, cols = int(height) // patch, int(width) // patch
        if rows * cols != int(self.processor.image_seq_length):
            raise AdapterError(
                f"paligemma: a {height}x{width} image in {patch} px patches makes {rows * cols} tokens, "
                f"but the processor inserts image_seq_length={self.processor.image_seq_length}"
            )
        return rows, cols

    def visual_views(self, inputs: dict, index: int, image_size: tuple[int, int]) -> list[VisualView]:
        # The square resize stretches the whole original image onto the grid: no crop, no pad.
        width, height = image_size
        positions = self.image_token_positions(inputs, index)
        return [VisualView("image", positions, self.grid, (0.0, 0.0, float(width), float(height)))]

    # -- tiny models for tests --------------------------------------------------------
    @classmethod
    def build_tiny(
        cls,
        directory: Path | None = None,
        *,
        words: list[str] | None = None,
        layers: int = 2,
        heads: int = 4,
        kv_heads: int = 1,
        head_dim: int = 16,
        image_size: int = 56,
        patch_size: int = 14,
        vision_layers: int = 1,
        gemma2: bool = False,
        attn_logit_softcapping: float = 5.0,
        query_pre_attn_scalar: int = 24,
        sliding_window: int = 12,
        init_std: float = 0.02,
        attn_implementation: str | None = None,
        hidden: int | None = None,
        intermediate: int | None = None,
        vocab_size: int | None = None,
    ) -> tuple[Any, Any]:
        """A tiny random PaliGemma (``gemma2=False``) or PaliGemma 2 and its processor.

        The Gemma 2 settings are chosen to bite on random weights: ``query_pre_attn_scalar``
        differs from ``head_dim`` so the scaling is not 1/sqrt(head_dim), a 12-token window
        on the sliding layers hides part of the 16 image tokens from the description rows,
        and a softcap of 5 clips the logits once ``init_std`` (the weights' init std) is
        large enough to make logits of that size: at HF's 0.02 they stay near 0.02 and
        the tanh is the identity to 1e-7.

        ``hidden`` (default heads x head_dim; Gemma 2 2B has 2304 for 8 x 256),
        ``intermediate`` (default 2 x hidden) and ``vocab_size`` (default: the tokenizer's
        size; larger leaves unused rows) let a benchmark give the text model a real
        checkpoint's dimensions.
        """
        from transformers import (
            AddedToken,
            PaliGemmaConfig,
            PaliGemmaForConditionalGeneration,
            PaliGemmaProcessor,
            SiglipImageProcessor,
        )

        tokenizer = word_level_tokenizer(
            words or [], SPECIAL_TOKENS, bos_token="<bos>", eos_token="<eos>",
            extra={"image_token": "<image>"},
        )  # fmt: skip
        tokenizer.add_tokens([AddedToken(SEPARATOR, normalized=False)])
        grid = image_size // patch_size
        image_processor = SiglipImageProcessor(
            size={"height": image_size, "width": image_size}, image_seq_length=grid * grid,
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        )  # fmt: skip
        # The processor adds the 1024 <loc> and 128 <seg> tokens: size the vocabulary after it.
        processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
        hidden = hidden or heads * head_dim
        vocab = max(len(tokenizer), vocab_size or 0)
        text: dict[str, Any] = dict(
            model_type="gemma2" if gemma2 else "gemma", vocab_size=vocab, hidden_size=hidden,
            intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv_heads, head_dim=head_dim, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            initializer_range=init_std,
        )  # fmt: skip
        if gemma2:
            text.update(
                attn_logit_softcapping=attn_logit_softcapping, final_logit_softcapping=30.0,
                query_pre_attn_scalar=query_pre_attn_scalar, sliding_window=sliding_window,
            )  # fmt: skip
        vision = dict(
            model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
            num_hidden_layers=vision_layers, num_attention_heads=2, image_size=image_size,
            patch_size=patch_size, vision_use_head=False,
        )  # fmt: skip
        config = PaliGemmaConfig(
            text_config=text, vision_config=vision, image_token_index=tokenizer.image_token_id,
            projection_dim=hidden, hidden_size=hidden, vocab_size=vocab,
        )  # fmt: skip
        if attn_implementation is not None:
            config._attn_implementation = attn_implementation
        model = PaliGemmaForConditionalGeneration(config).eval()
        if directory is not None:
            model.save_pretrained(directory)
            processor.save_pretrained(directory)
        return model, processor

