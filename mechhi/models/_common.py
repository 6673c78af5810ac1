"""What every model adapter shares: the adapter interface, prompt rendering, answer-token
location and mask-to-token-grid coverage.

An adapter is the only place that knows a family's token layout. Everything it reports
about one processed sample is a `SampleLayout`:

- ``query_positions``: sequence indices of the description (answer) tokens, the rows
  whose attention mechhi reads;
- ``views``: one `VisualView` per visual view of the image (``"image"`` for the main
  grid or tile mosaic; Idefics3 adds ``"global"``). A view lists the sequence index of
  every visual token *in row-major grid order*, its grid shape, and the box of the
  original image (pixels, x0 y0 x1 y1) that the grid covers after the processor's
  resize/crop, so an object mask can be carried onto the same grid.

Coverage is computed exactly: the fraction of a token cell's area inside the object,
integrating the piecewise-constant mask over the cell's (fractional) pixel box.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from mechhi.data.format import displayed_size


class AdapterError(ValueError):
    """A model, processor or prompt that an adapter cannot handle; the message says why."""


# ----------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class VisualView:
    """One grid of visual tokens and the part of the original image it covers."""

    name: str
    positions: np.ndarray  # (rows * cols,) sequence indices, row-major over the grid
    grid: tuple[int, int]  # (rows, cols)
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in original-image pixels

    def __post_init__(self) -> None:
        rows, cols = self.grid
        if len(self.positions) != rows * cols:
            raise AdapterError(
                f"view {self.name!r}: {len(self.positions)} visual tokens for a {rows}x{cols} grid"
            )

    def coverage(self, mask: np.ndarray) -> np.ndarray:
        """(rows, cols) fraction of each token's pixels inside ``mask``."""
        return box_coverage(mask, self.box, self.grid)


@dataclass(frozen=True)
class SampleLayout:
    """Where one sample's description tokens and visual tokens sit in its sequence."""

    query_positions: np.ndarray  # (n_query,)
    views: tuple[VisualView, ...]

    def split_views(self, values: np.ndarray) -> dict[str, np.ndarray]:
        """Cut (..., V) values over the concatenated visual tokens into (..., rows, cols) per view."""
        grids, start = {}, 0
        for v in self.views:
            rows, cols = v.grid
            grids[v.name] = values[..., start : start + rows * cols].reshape(*values.shape[:-1], rows, cols)
            start += rows * cols
        return grids

    def coverage(self, mask: np.ndarray) -> dict[str, np.ndarray]:
        """(rows, cols) object coverage per view."""
        return {v.name: v.coverage(mask) for v in self.views}

    def view(self, name: str) -> VisualView:
        for v in self.views:
            if v.name == name:
                return v
        raise KeyError(f"no view {name!r}; views: {[v.name for v in self.views]}")


@dataclass
class PreparedBatch:
    """Model inputs for a batch plus each sample's layout."""

    inputs: dict[str, torch.Tensor]
    layouts: list[SampleLayout]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PreparedBatch:
        moved = {}
        for key, value in self.inputs.items():
            if not isinstance(value, torch.Tensor):
                moved[key] = value
            elif value.is_floating_point() and dtype is not None:
                moved[key] = value.to(device=device, dtype=dtype)
            else:
                moved[key] = value.to(device)
        return PreparedBatch(moved, self.layouts)


@dataclass(frozen=True)
class PromptTemplate:
    """A user turn (image + text) and an assistant turn with the answer slot ``{answer}``.

    The answer's tokens are the query rows for tracing and the scored tokens for
    perplexity.
    """

    user: str
    assistant: str

    def assistant_parts(self, answer: str) -> tuple[str, str, str]:
        before, _, after = self.assistant.partition("{answer}")
        return before, answer, after


@dataclass(frozen=True)
class RenderedPrompt:
    """Text ready for the processor, and where the answer lies in it."""

    text: str  # the full text, as the processor's tokenizer will see it (unexpanded)
    answer_span: tuple[int, int]  # character span of the answer within ``text``
    processor_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. PaliGemma's suffix


# The paper's Appendix prompts. Families trained on other formats override them, under
# the same names. "vqa" needs the field ``options`` (the "A) ... B) ..." line).
CHAT_TEMPLATES: dict[str, PromptTemplate] = {
    "caption": PromptTemplate("What is this photo?", "This is a photo of {answer}."),
    "vqa": PromptTemplate("What is shown in this photo?\nChoose one of the options:\n{options}", "{answer}."),
}
TEMPLATE_NAMES: tuple[str, ...] = tuple(CHAT_TEMPLATES)
GRID_PROBE_ANSWER = "object"  # any answer: grids do not depend on the text


# ----------------------------------------------------------------------------- coverage


def box_coverage(
    mask: np.ndarray, box: tuple[float, float, float, float], grid: tuple[int, int]
) -> np.ndarray:
    """Fraction of each cell of a ``grid`` laid over ``box`` that lies inside ``mask``.

    The mask is a piecewise-constant function on the pixel plane, so its integral over
    [0, y] x [0, x] is bilinear between integer points: interpolating the integral image
    gives the exact area inside any fractional rectangle. Area outside the image counts
    as not covered.
    """
    mask = np.asarray(mask, dtype=np.float64)
    height, width = mask.shape
    integral = np.zeros((height + 1, width + 1))
    integral[1:, 1:] = mask.cumsum(0).cumsum(1)
    rows, cols = grid
    x0, y0, x1, y1 = box
    ys = np.clip(np.linspace(y0, y1, rows + 1), 0, height)
    xs = np.clip(np.linspace(x0, x1, cols + 1), 0, width)
    cumulative = _bilinear(integral, ys, xs)  # (rows + 1, cols + 1)
    inside = cumulative[1:, 1:] - cumulative[:-1, 1:] - cumulative[1:, :-1] + cumulative[:-1, :-1]
    cell_area = ((y1 - y0) / rows) * ((x1 - x0) / cols)
    return np.clip(inside / cell_area, 0.0, 1.0)


def _bilinear(table: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """``table`` interpolated at the outer product of fractional coordinates."""
    y_lo = np.minimum(np.floor(ys).astype(int), table.shape[0] - 2)
    x_lo = np.minimum(np.floor(xs).astype(int), table.shape[1] - 2)
    fy = (ys - y_lo)[:, None]
    fx = (xs - x_lo)[None, :]
    t00 = table[np.ix_(y_lo, x_lo)]
    t01 = table[np.ix_(y_lo, x_lo + 1)]
    t10 = table[np.ix_(y_lo + 1, x_lo)]
    t11 = table[np.ix_(y_lo + 1, x_lo + 1)]
    return t00 * (1 - fy) * (1 - fx) + t01 * (1 - fy) * fx + t10 * fy * (1 - fx) + t11 * fy * fx


# ----------------------------------------------------------------------------- answers


def answer_token_ids(tokenizer: Any, rendered: RenderedPrompt) -> list[int]:
    """Ids of the tokens that overlap the answer's characters, tokenized in context.

    Tokenizing in context (not the answer alone) keeps the leading-space and merge
    behaviour the model will actually see.
    """
    encoded = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    start, end = rendered.answer_span
    ids = [
        token_id
        for token_id, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"])
        if b > start and a < end and b > a
    ]
    if not ids:
        raise AdapterError(f"the answer {rendered.text[start:end]!r} produced no tokens")
    return ids


def locate_last(sequence: np.ndarray, pattern: Sequence[int], valid: np.ndarray) -> np.ndarray:
    """Positions of the last occurrence of ``pattern`` among the ``valid`` positions.

    The answer always comes last in the prompt, after the image and the question (which
    may quote the same words, as VQA options do), so the last occurrence is the answer.
    """
    pattern = np.asarray(pattern)
    n = len(pattern)
    candidates = np.flatnonzero(valid)
    for start in candidates[::-1]:
        window = slice(start, start + n)
        if start + n <= len(sequence) and valid[window].all() and np.array_equal(sequence[window], pattern):
            return np.arange(start, start + n)
    raise AdapterError("the answer tokens were not found in the processed sequence")


# ----------------------------------------------------------------------------- adapter


class VLMAdapter:
    """Base class of the family adapters: shared prompt and batch logic.

    A family subclass sets the class attributes, implements `visual_views`, and, when its
    processor is not driven by a chat template, overrides `render`.
    """

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]  # HF config.model_type values handled
    decoder_layers: ClassVar[str] = "model.language_model.layers"  # from the top model
    attention: ClassVar[str] = "self_attn"  # from one decoder layer
    vision_tower: ClassVar[str] = "model.vision_tower"
    templates: ClassVar[dict[str, PromptTemplate]] = CHAT_TEMPLATES
    image_token_attr: ClassVar[str] = "image_token_id"  # attribute of the config
    variable_image_size: ClassVar[bool] = True  # False: the processor makes every image one size
    padding_side: ClassVar[str | None] = None  # force "left"/"right" where the model needs it

    def __init__(self, config: Any, processor: Any) -> None:
        self.config = config
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)

    # -- identification ---------------------------------------------------------------
    @classmethod
    def matches(cls, config: Any) -> bool:
        return getattr(config, "model_type", None) in cls.model_types

    @property
    def text_config(self) -> Any:
        return self.config.get_text_config()

    @property
    def n_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def n_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def image_token_id(self) -> int:
        value = getattr(self.config, self.image_token_attr, None)
        if value is None:
            value = getattr(self.config, "image_token_index", None)
        if value is None:
            raise AdapterError(f"{self.family}: the config names no image token id")
        return int(value)

    def lora_target_regex(self, layers: Sequence[int]) -> str:
        """Full-match regex for q/k/v of the given decoder layers only (never the vision tower)."""
        indices = "|".join(str(i) for i in sorted(set(layers)))
        path = re.escape(self.decoder_layers)
        return rf"(.*\.)?{path}\.({indices})\.{re.escape(self.attention)}\.(q|k|v)_proj"

    # -- prompts ----------------------------------------------------------------------
    def template(self, name: str) -> PromptTemplate:
        """The prompt template called ``name``; an unknown name lists the choices."""
        if name not in self.templates:
            raise AdapterError(f"unknown prompt template {name!r}; choose {' or '.join(self.templates)}")
        return self.templates[name]

    def prompt_text(self, template: str) -> str:
        """The whole prompt as the model's tokenizer sees it, with ``{description}`` (and
        ``{options}``) where each sample's text goes: what a store records as ``prompt``."""
        return self.render(template, "{description}", options="{options}").text

    def render(self, template: str, answer: str, **fields: str) -> RenderedPrompt:
        """Apply the processor's chat template to (image + user text, assistant answer)."""
        tpl = self.template(template)
        missing = sorted(set(re.findall(r"{(\w+)}", tpl.user)) - set(fields))
        if missing:
            raise AdapterError(f"prompt template {template!r} needs the field(s) {', '.join(missing)}")
        before, answer, after = tpl.assistant_parts(answer)
        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": tpl.user.format(**fields)}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": f"{before}{answer}{after}"}]},
        ]
        text = self.processor.apply_chat_template(messages, tokenize=False)
        marker = f"{before}{answer}{after}"
        start = text.rfind(marker)
        if start < 0:
            raise AdapterError(f"{self.family}: the chat template changed the answer text")
        start += len(before)
        return RenderedPrompt(text=text, answer_span=(start, start + len(answer)))

    # -- batches ----------------------------------------------------------------------
    def prepare(
        self,
        images: Sequence[Image.Image],
        answers: Sequence[str],
        *,
        template: str = "caption",
        fields: Sequence[dict[str, str]] | None = None,
    ) -> PreparedBatch:
        """Process a batch and find each sample's description and visual tokens."""
        if len(images) != len(answers):
            raise AdapterError("images and answers differ in length")
        fields = fields or [{} for _ in answers]
        rendered = [self.render(template, a, **f) for a, f in zip(answers, fields)]
        inputs = self.process(images, rendered)
        ids = inputs["input_ids"].numpy()
        valid = inputs["attention_mask"].numpy().astype(bool)
        layouts = []
        for i, (image, prompt) in enumerate(zip(images, rendered)):
            query = locate_last(ids[i], answer_token_ids(self.tokenizer, prompt), valid[i])
            views = tuple(self.visual_views(inputs, i, displayed_size(image)))  # boxes in full-size pixels
            layouts.append(SampleLayout(query_positions=query, views=views))
        return PreparedBatch(inputs=inputs, layouts=layouts)

    def process(self, images: Sequence[Image.Image], rendered: Sequence[RenderedPrompt]) -> dict:
        """Run the processor on a batch of rendered prompts.

        ``rendered.text`` is what the processor gets as ``text`` unless the prompt's
        ``processor_kwargs`` carry their own ``text`` (PaliGemma passes the prefix there and
        the answer as ``suffix``). ``padding_side`` None keeps the processor's own choice.
        """
        texts = [p.processor_kwargs.get("text", p.text) for p in rendered]
        keys = sorted({key for p in rendered for key in p.processor_kwargs} - {"text"})
        kwargs: dict[str, Any] = {key: [p.processor_kwargs[key] for p in rendered] for key in keys}
        if self.padding_side is not None:
            kwargs["padding_side"] = self.padding_side
        out = self.processor(
            text=texts,
            images=[[im.convert("RGB")] for im in images],
            padding=True,
            return_tensors="pt",
            **kwargs,
        )
        return {k: v for k, v in out.items() if k in self.model_input_names()}

    def model_input_names(self) -> set[str]:
        return set(self.processor.model_input_names) - {"labels"}

    def image_token_positions(self, inputs: dict, index: int) -> np.ndarray:
        return np.flatnonzero(inputs["input_ids"][index].numpy() == self.image_token_id)

    def visual_views(self, inputs: dict, index: int, image_size: tuple[int, int]) -> list[VisualView]:
        """The visual views of sample ``index``; ``image_size`` is the original (width, height)."""
        raise NotImplementedError

    def grid_sizes(self, image_size: tuple[int, int]) -> dict[str, tuple[int, int]]:
        """Each view's (rows, cols) for an image of ``image_size`` (width, height), without
        the image: a store sizes its grids before any sample is traced, and reading and
        processing every image only for that would double the trace's data loading.

        The grid depends only on the image's size (every family's resize rule is a function
        of it), so by default the processor runs once per distinct size on a blank image,
        and once in all where it makes every image one size. Families with a closed-form
        rule override this; the tests check each against the processor on many sizes.
        """
        key = (int(image_size[0]), int(image_size[1])) if self.variable_image_size else None
        cache: dict[Any, dict[str, tuple[int, int]]] = self.__dict__.setdefault("_grid_cache", {})
        if key not in cache:
            blank = Image.new("RGB", key or (int(image_size[0]), int(image_size[1])))
            layout = self.prepare([blank], [GRID_PROBE_ANSWER]).layouts[0]
            cache[key] = {v.name: v.grid for v in layout.views}
        return dict(cache[key])

    # -- image sizes (`mechhi.data.format.ImageUse`) ---------------------------------------
    def image_size_problem(self, image_size: tuple[int, int]) -> str | None:
        """Why the processor refuses an image of ``image_size`` (width, height), or None.
        Asked of the processor's own size rule (`grid_sizes`), not of a limit copied here, so
        whatever it refuses (Qwen2-VL: an aspect ratio over 200) is a bad record found by
        `mechhi dataset check --model` and skipped by `trace --skip-bad`, before any forward."""
        try:
            self.grid_sizes(image_size)
        except (ValueError, ZeroDivisionError, OverflowError) as error:
            return str(error) or type(error).__name__
        return None

    def resized_size(self, image_size: tuple[int, int]) -> tuple[int, int] | None:
        """The (width, height) the processor resizes an image of ``image_size`` to; None
        where the adapter does not know it (images are then decoded in full)."""
        return None

    def shrink_factor(self, image_size: tuple[int, int], factors: Sequence[int]) -> int:
        """The largest of ``factors`` by which an image of ``image_size`` may be decoded
        reduced (each side divided, rounded up) with the processor making the same of it:
        still at least the size it resizes to, and the same token grids. 1: in full."""
        target = self.resized_size(image_size)
        if target is None:
            return 1
        width, height = image_size
        grids = self.grid_sizes(image_size)
        for factor in sorted(factors, reverse=True):
            small = (-(-width // factor), -(-height // factor))
            if small[0] >= target[0] and small[1] >= target[1] and self.grid_sizes(small) == grids:
                return factor
        return 1
