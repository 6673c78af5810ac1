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

from mechhi.models._common import AdapterError, PromptTemplate, RenderedPrompt, VisualView, VLMAdapter

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
