"""Where the tracers reach into a model through nnsight: the adapter's dotted paths
resolved on the wrapped model, and the generated ``.source`` label of each layer's
attention-function call. Raw nnsight paths and labels appear nowhere else."""

from __future__ import annotations

import re
from typing import Any

import torch
from nnsight import NNsight

from mechhi.models import VLMAdapter
from mechhi.models.loading import input_device

ATTENTION_CALL = re.compile(r"\battention_interface\s*\(")

# The attention module's output projection. Its input is the heads' outputs side by side
# (B, T, heads * head_dim), so a head's slice of it is that head's whole contribution:
# where Head Pursuit reads a head's write and where ``mechhi.intervene`` changes a head.
OUTPUT_PROJECTION = "o_proj"


class TracingError(RuntimeError):
    """The model's attention forward does not look as the tracer expects."""


def find_attention_call(attention_envoy: Any) -> str:
    """The nnsight ``.source`` label of the attention-function call in one attention module.

    Labels are generated and differ across nnsight/transformers versions
    (``attention_interface_0``, ``_1``, ``_2``), so the label is looked up: the operation
    whose source line calls ``attention_interface(``.
    """
    source = attention_envoy.source
    lines = source.compiled.source.splitlines()
    calls = [
        name
        for name in source.names
        if name.startswith("attention_interface_")
        and ATTENTION_CALL.search(lines[source.compiled.lines[name] - 1])
    ]
    if len(calls) != 1:
        raise TracingError(
            f"expected one attention_interface(...) call in {type(attention_envoy._module).__name__}"
            f".forward, found {calls}; operations: {list(source.names)}"
        )
    return calls[0]


class DecoderTracer:
    """An nnsight-wrapped model and its decoder layers' envoys, in forward order."""

    def __init__(self, model: torch.nn.Module, adapter: VLMAdapter) -> None:
        self.model = model
        self.adapter = adapter
        self.nn = NNsight(model)
        layers = resolve(self.nn, adapter.decoder_layers)
        self.layers = [layers[i] for i in range(len(layers._module))]

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embeddings' device (one of several when accelerate
        has split the model with a device map; its hooks move what each module needs)."""
        return input_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def output_projections(root: Any, adapter: VLMAdapter) -> list[Any]:
    """Each decoder layer's attention output projection, in forward order, under ``root``
    (an nnsight wrapper of the model, or the plain ``torch.nn.Module``)."""
    layers = resolve(root, adapter.decoder_layers)
    count = len(getattr(layers, "_module", layers))
    return [resolve(layers[i], f"{adapter.attention}.{OUTPUT_PROJECTION}") for i in range(count)]


def resolve(envoy: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy
