"""Model adapters, one file per architecture family, found from the model's config.

`adapter_for(config, processor)` walks `FAMILIES` in order; the first family whose
`matches(config)` is true handles the model. An unknown config fails with a message
naming the supported families.
"""

from __future__ import annotations

from typing import Any

from mechhi.models._common import (
    TEMPLATE_NAMES,
    AdapterError,
    PreparedBatch,
    SampleLayout,
    VisualView,
    VLMAdapter,
)
from mechhi.models.gemma3 import Gemma3Adapter
from mechhi.models.idefics3 import Idefics3Adapter
from mechhi.models.llava import LlavaAdapter
from mechhi.models.paligemma import PaliGemmaAdapter
from mechhi.models.qwen2_vl import Qwen2VLAdapter

FAMILIES: list[type[VLMAdapter]] = [
    Qwen2VLAdapter,
    PaliGemmaAdapter,
    Idefics3Adapter,
    LlavaAdapter,
    Gemma3Adapter,
]


def adapter_class(config: Any) -> type[VLMAdapter]:
    for family in FAMILIES:
        if family.matches(config):
            return family
    supported = ", ".join(f"{f.family} ({'/'.join(f.model_types)})" for f in FAMILIES)
    raise AdapterError(
        f"no adapter for model_type {getattr(config, 'model_type', None)!r}; supported: {supported}"
    )


def adapter_for(config: Any, processor: Any) -> VLMAdapter:
    return adapter_class(config)(config, processor)


def family_named(name: str) -> type[VLMAdapter]:
    for family in FAMILIES:
        if family.family == name:
            return family
    raise AdapterError(f"unknown family {name!r}; known: {[f.family for f in FAMILIES]}")


__all__ = [
    "FAMILIES",
    "TEMPLATE_NAMES",
    "AdapterError",
    "PreparedBatch",
    "SampleLayout",
    "VLMAdapter",
    "VisualView",
    "adapter_class",
    "adapter_for",
    "family_named",
]
