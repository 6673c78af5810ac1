"""The benchmark's models: random weights with the text dimensions of real checkpoints.

mechhi's capture touches only the language model (the attention inputs of its decoder
layers), so that is what has to be real: depth, width, heads, KV heads, head dim, MLP
width and vocabulary are the published checkpoints'. Each model is built by its family's
`mechhi.models.tiny` builder (the real transformers class, the real processor), with a
small vision tower: the tower runs in every mode alike and is not what is measured, so
a small one only keeps the floor honest (a real tower would add the same seconds to
every mode and flatter the ratios).

How a model gets a given number of visual tokens, through its own processor (no
bypassed vision tower, so the sequence, the mask and the token layout are exactly what
``adapter.prepare`` makes of an image):

- Qwen2-VL: an image of (28 a) x (28 b) px gives a x b tokens (14 px patches merged
  2 x 2); a x b is the target exactly (8192 = 64 x 128).
- PaliGemma 2: a square patch grid of g x g tokens, g = round(sqrt(target)) (256, 1024,
  4096 are the real 224 / 448 / 896 px checkpoints; 8192 becomes 90 x 90 = 8100, which
  keeps the sequence inside Gemma 2's 8192 positions). The vision tower is built for
  that image size.
- SmolVLM: SmolVLM's own 81 tokens per tile (27 x 27 patches of 14 px, pixel shuffle
  3) and an r x c tile grid plus the global image, (r c + 1) x 81 tokens as close to
  the target as a near-square grid gets (243, 1053, 4131, 8181).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from mechhi.models import PreparedBatch, VLMAdapter
from mechhi.models.idefics3 import Idefics3Adapter
from mechhi.models.llava import LlavaAdapter
from mechhi.models.paligemma import PaliGemmaAdapter
from mechhi.models.qwen2_vl import Qwen2VLAdapter
from mechhi.models.tiny import build_tiny

# Words the benchmark's prompt uses; the word-level tokenizer needs them in its vocabulary.
DESCRIPTION = "a small red circle next to a large blue square"
WORDS = sorted(set(DESCRIPTION.split()))


@dataclass(frozen=True)
class TextDims:
    """A checkpoint's language-model dimensions."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class Geometry:
    """How to get a number of visual tokens from one family's processor."""

    visual_tokens: int  # what the processor will actually produce
    image_size: tuple[int, int]  # (width, height) of the input image
    build: dict[str, Any] = field(default_factory=dict)  # build_tiny arguments that change the model
    processor: dict[str, Any] = field(
        default_factory=dict
    )  # build_tiny arguments that change only the processor


@dataclass(frozen=True)
class BenchConfig:
    """One benchmarked architecture: a real checkpoint's text model on its family's class."""

    name: str
    checkpoint: str  # whose dimensions these are
    family: type[VLMAdapter]
    text: TextDims
    build: dict[str, Any] = field(default_factory=dict)  # family-specific build_tiny arguments
    tied: bool = False  # the checkpoint's output embedding is its input embedding
    default: bool = True  # benchmarked when no --configs is given

    def geometry(self, target: int) -> Geometry:
        return GEOMETRIES[self.family.family](target)

    def build_kwargs(self, target: int, layers: int | None = None) -> dict[str, Any]:
        """``build_tiny`` arguments for this config at ``target`` visual tokens."""
        geometry = self.geometry(target)
        return {**self._model_kwargs(geometry, layers), **geometry.processor}

    def model_key(self, target: int, layers: int | None = None) -> str:
        """Equal for two sizes that need the same model (only their processors differ)."""
        return repr(sorted(self._model_kwargs(self.geometry(target), layers).items()))

    def _model_kwargs(self, geometry: Geometry, layers: int | None) -> dict[str, Any]:
        t = self.text
        return dict(
            words=WORDS,
            layers=layers or t.layers,
            heads=t.heads,
            kv_heads=t.kv_heads,
            head_dim=t.head_dim,
            intermediate=t.intermediate,
            vocab_size=t.vocab,
            **self.build,
            **geometry.build,
        )


def qwen2_vl_geometry(target: int) -> Geometry:
    rows = max(d for d in range(1, math.isqrt(target) + 1) if target % d == 0)  # the squarest a x b
    cols = target // rows
    return Geometry(rows * cols, (28 * cols, 28 * rows), processor={"max_pixels": 28 * 28 * rows * cols})


def paligemma_geometry(target: int) -> Geometry:
    side = min(round(math.sqrt(target)), 90)  # 90 x 90 + text stays under Gemma 2's 8192 positions
    return Geometry(side * side, (14 * side, 14 * side), {"image_size": 14 * side, "patch_size": 14})


SMOLVLM_TILE = 27  # patches per tile side (384 px SigLIP tiles at 14 px); 81 tokens after the 3x3 shuffle


def smolvlm_geometry(target: int) -> Geometry:
    per_tile = (SMOLVLM_TILE // 3) ** 2
    grids = [(r, c) for r in range(1, 16) for c in range(r, 2 * r + 2) if c > 1]  # near-square, split
    rows, cols = min(grids, key=lambda g: (abs((g[0] * g[1] + 1) * per_tile - target), g[1] - g[0]))
    tile = SMOLVLM_TILE * 14
    build = {"tile_patches": SMOLVLM_TILE, "scale_factor": 3, "smolvlm": True}
    # tiles_per_side sets the processor's longest edge (and the tokenizer's tile markers):
    # the model is the same at every size
    return Geometry((rows * cols + 1) * per_tile, (cols * tile, rows * tile), build, {"tiles_per_side": cols})


def llava_geometry(target: int) -> Geometry:
    """A square crop of side x side patches of 14 px (CLS dropped): side^2 tokens."""
    side = max(1, round(math.sqrt(target)))
    crop = 14 * side
    return Geometry(side * side, (crop, crop), {"crop": crop, "shortest_edge": crop, "patch": 14})


GEOMETRIES = {
    "qwen2-vl": qwen2_vl_geometry,
    "paligemma": paligemma_geometry,
    "idefics3": smolvlm_geometry,
    "llava": llava_geometry,
}

CONFIGS: dict[str, BenchConfig] = {
    c.name: c
    for c in [
        BenchConfig(
            "qwen2-vl-2b",
            "Qwen/Qwen2-VL-2B-Instruct",
            Qwen2VLAdapter,
            TextDims(
                layers=28, hidden=1536, heads=12, kv_heads=2, head_dim=128, intermediate=8960, vocab=151936
            ),
            tied=True,
        ),
        BenchConfig(
            "paligemma2-3b",
            "google/paligemma2-3b-pt-224",
            PaliGemmaAdapter,
            TextDims(
                layers=26, hidden=2304, heads=8, kv_heads=4, head_dim=256, intermediate=9216, vocab=257216
            ),
            # Gemma 2: softcap 50 (no SDPA path, so transformers runs eager), scaling by
            # query_pre_attn_scalar, a 4096-token window on alternate layers
            {
                "gemma2": True,
                "hidden": 2304,
                "attn_logit_softcapping": 50.0,
                "query_pre_attn_scalar": 256,
                "sliding_window": 4096,
                "attn_implementation": "eager",
            },
        ),
        BenchConfig(
            # the zoo's pretrained build (`mechhi zoo build dinov2-smollm2`): SmolLM2-135M in LLaVA
            "smollm2-llava",
            "HuggingFaceTB/SmolLM2-135M-Instruct (zoo: dinov2-smollm2)",
            LlavaAdapter,
            TextDims(layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152),
            tied=True,
            default=False,  # the small real depth: `--configs smollm2-llava`
        ),
        BenchConfig(
            "smolvlm",
            "HuggingFaceTB/SmolVLM-Instruct",
            Idefics3Adapter,
            TextDims(
                layers=24, hidden=2048, heads=32, kv_heads=32, head_dim=64, intermediate=8192, vocab=49152
            ),
        ),
    ]
}


DEFAULT_CONFIGS = tuple(name for name, c in CONFIGS.items() if c.default)
NARROW = "-narrow"


def narrow_name(name: str) -> str:
    return name + NARROW


def config_named(name: str) -> BenchConfig:
    """A config by name; ``<name>-narrow`` is its narrow twin (`narrow`)."""
    if name.endswith(NARROW) and name.removesuffix(NARROW) in CONFIGS:
        return narrow(CONFIGS[name.removesuffix(NARROW)])
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[name]


def narrow(config: BenchConfig) -> BenchConfig:
    """The same architecture and depth at a tiny width: its forward is mostly Python, so
    what a tracer adds per module and per layer shows in milliseconds."""
    kv_heads = 2 if config.text.kv_heads == config.text.heads else 1  # MHA stays MHA, GQA stays GQA
    text = TextDims(
        layers=config.text.layers,
        hidden=2 * 16,
        heads=2,
        kv_heads=kv_heads,
        head_dim=16,
        intermediate=64,
        vocab=1024,
    )
    build = {**config.build, **({"hidden": text.hidden} if "hidden" in config.build else {})}
    return replace(config, name=narrow_name(config.name), text=text, build=build)


def bench_image(geometry: Geometry, seed: int = 0) -> Image.Image:
    """A noise image of the geometry's size (the content does not change the cost)."""
    width, height = geometry.image_size
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@dataclass
class Built:
    """A benchmark model, its adapter and one prepared batch."""

    model: Any
    adapter: VLMAdapter
    batch: PreparedBatch
    geometry: Geometry

    @property
    def seq_len(self) -> int:
        return int(self.batch.inputs["input_ids"].shape[1])


def build(
    config: BenchConfig,
    target: int,
    *,
    layers: int | None = None,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    model: Any = None,
) -> Built:
    """The config's model (seeded: every process builds the same weights) and a batch
    of ``batch_size`` images with ``target`` visual tokens each, on ``device``.

    ``model``: one already built for a size with the same `BenchConfig.model_key`; only
    this size's processor is made (on the meta device, without weights)."""
    kwargs = config.build_kwargs(target, layers)
    if model is None:
        model, processor = _new_model(config, kwargs, device, dtype, seed)
    else:
        with torch.device("meta"):
            processor = build_tiny(config.family.family, **kwargs)[1]
    adapter = config.family(model.config, processor)
    geometry = config.geometry(target)
    images = [bench_image(geometry, seed=i) for i in range(batch_size)]
    batch = adapter.prepare(images, [DESCRIPTION] * batch_size).to(device, dtype)
    found = sum(len(v.positions) for v in batch.layouts[0].views)
    if found != geometry.visual_tokens:
        raise RuntimeError(f"{config.name}: {found} visual tokens, expected {geometry.visual_tokens}")
    return Built(model, adapter, batch, geometry)


def _new_model(
    config: BenchConfig, kwargs: dict[str, Any], device: torch.device | str, dtype: torch.dtype, seed: int
) -> tuple[Any, Any]:
    """Built where it runs, initialised once: torch's own per-layer initialisation is skipped
    because transformers' ``init_weights`` overwrites every weight anyway (the same
    distributions and buffers; a third of the build time on CPU)."""
    from transformers.initialization import no_init_weights

    torch.manual_seed(seed)
    with no_init_weights(), torch.device(device):
        model, processor = build_tiny(config.family.family, **kwargs)
    model.init_weights()
    if config.tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    return model.to(device=device, dtype=dtype).eval(), processor
