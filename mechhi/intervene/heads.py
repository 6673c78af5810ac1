"""Head edits: the one place where mechhi changes what an attention head writes.

Where. A head's whole contribution to the residual stream is its slice of the attention
output at the input of the layer's output projection (``o_proj``: the heads' outputs side
by side, ``head_dim`` columns each). Scaling head h of layer l by alpha is therefore
``x[:, :, h*hd:(h+1)*hd] *= alpha`` on that input (alpha = 0 zero-ablates, -1 flips,
> 1 enhances), and mean ablation sets the slice to a fixed vector (the head's mean output
over a reference set, ``mechhi.intervene.reference``). The path comes from the adapter
through ``mechhi.trace.sites.output_projections``; nothing else knows it. Every position
of every forward pass is edited, generation steps included.

How: through nnsight.

- In your own trace: ``editor.apply(edit)`` inside ``with editor.nn.trace(**inputs):``.
- For code that takes a model (every metric of ``mechhi.evaluate``, ``model.generate``):
  ``with editor.edited(edit) as model: ...`` stores the edit on the nnsight wrapper
  (``Envoy.edit``, replayed at every occurrence: ``tracer.all()``) and yields an
  :class:`EditedModel` whose ``__call__`` and ``generate`` run through the wrapper
  (``trace(..., trace=False)``: no trace body, only the stored edit).

Why a stand-in and not the model itself: nnsight replays a stored edit only for runs that
go through its interleaver; calling the wrapped ``torch.nn.Module`` directly runs the
model as it was (nnsight 0.8.1, ``intervention/editing.py``). Code that calls
``model(**inputs)`` therefore gets the stand-in, which forwards every other attribute to
the real model. The tests check both routes against a plain ``register_forward_pre_hook``
on ``o_proj`` that edits the same columns.

>>> editor = HeadEditor(model, adapter)                                     # doctest: +SKIP
>>> with editor.edited(HeadEdit.scaled([(3, 1), (5, 0)], alpha=0.0)) as ablated:  # doctest: +SKIP
...     closed_vqa(ablated, adapter, items)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xarray as xr
from nnsight import NNsight

from mechhi.models import VLMAdapter
from mechhi.store.schema import Head
from mechhi.trace.sites import output_projections

# A stored edit loops over every occurrence of its sites (``tracer.all()``); nnsight says
# so with a UserWarning when the run ends before a next occurrence, which is by design.
_LOOP_END = r".*was never reached"


@dataclass(frozen=True)
class HeadEdit:
    """What to do to which heads: ``scale`` multiplies a head's output by alpha, ``replace``
    sets it to a fixed (head_dim,) vector. A head may appear in only one of them."""

    scale: Mapping[Head, float] = field(default_factory=dict)
    replace: Mapping[Head, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        both = sorted(set(self.scale) & set(self.replace))
        if both:
            raise ValueError(f"HeadEdit: heads {both} are both scaled and replaced")
        for layer, head in [*self.scale, *self.replace]:
            if int(layer) < 0 or int(head) < 0:
                raise ValueError(f"HeadEdit: (layer {layer}, head {head}) must be non-negative")

    @classmethod
    def scaled(cls, heads: Iterable[Head], alpha: float) -> HeadEdit:
        """Every head of ``heads`` times ``alpha`` (0: zero ablation, -1: flip, > 1: enhance)."""
        return cls(scale={(int(l), int(h)): float(alpha) for l, h in heads})

    @classmethod
    def mean_ablated(cls, heads: Iterable[Head], means: xr.DataArray) -> HeadEdit:
        """Every head of ``heads`` replaced by its mean output, ``means`` (layer, head, head_dim)."""
        return cls(replace={(int(l), int(h)): means.sel(layer=l, head=h).values for l, h in heads})

    @property
    def heads(self) -> list[Head]:
        return sorted([*self.scale, *self.replace])

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.heads})

    def __bool__(self) -> bool:
        return bool(self.scale or self.replace)


@dataclass(frozen=True)
class _Step:
    """One head's edit, ready to run: its columns, and alpha or the replacing vector."""

    columns: slice
    alpha: float | None
    vector: torch.Tensor | None


class HeadEditor:
    """The nnsight wrapper of a model and its output projections: applies ``HeadEdit`` s.

    >>> editor = HeadEditor(model, adapter)                           # doctest: +SKIP
    >>> with editor.nn.trace(**batch.inputs):                         # doctest: +SKIP
    ...     editor.apply(HeadEdit.scaled([(2, 1)], alpha=-1.0))
    ...     logits = editor.nn.output.logits.save()
    """

    def __init__(self, model: torch.nn.Module, adapter: VLMAdapter) -> None:
        self.model = model
        self.adapter = adapter
        self.nn = NNsight(model)
        self.projections = output_projections(self.nn, adapter)
        width = int(self.projections[0]._module.in_features)  # heads * head_dim
        if width % adapter.n_heads:
            raise ValueError(
                f"{adapter.family}: o_proj input width {width} is not a multiple of {adapter.n_heads} heads"
            )
        self.head_dim = width // adapter.n_heads

    def _plan(self, edit: HeadEdit) -> dict[int, list[_Step]]:
        """The edit checked against the model, per layer, vectors as tensors on its device."""
        n_layers, n_heads = len(self.projections), self.adapter.n_heads
        bad = [(l, h) for l, h in edit.heads if l >= n_layers or h >= n_heads]
        if bad:
            raise ValueError(f"head edit: {bad} outside the model's {n_layers} layers x {n_heads} heads")
        plan: dict[int, list[_Step]] = {}
        for layer, head in edit.heads:
            columns = slice(head * self.head_dim, (head + 1) * self.head_dim)
            if (layer, head) in edit.scale:
                step = _Step(columns, float(edit.scale[(layer, head)]), None)
            else:
                weight = self.projections[
                    layer
                ]._module.weight  # the layer's own device (models split across GPUs)
                vector = torch.as_tensor(
                    np.asarray(edit.replace[(layer, head)]), dtype=weight.dtype, device=weight.device
                )
                if vector.shape != (self.head_dim,):
                    raise ValueError(
                        f"head edit: replacement for {(layer, head)} has shape {tuple(vector.shape)}, "
                        f"expected ({self.head_dim},)"
                    )
                step = _Step(columns, None, vector)
            plan.setdefault(layer, []).append(step)
        return plan

    def apply(self, edit: HeadEdit) -> None:
        """Inside an open trace of ``self.nn``: edit the chosen heads at their layers' ``o_proj``
        input, layers in forward order (nnsight requires it)."""
        _run(self.projections, self._plan(edit))

    @contextmanager
    def edited(self, edit: HeadEdit) -> Iterator[Any]:
        """The model with ``edit`` applied at every forward, generation steps included.

        Yields the plain model for an empty edit, else an :class:`EditedModel`; the stored
        edit is cleared on exit.
        """
        if not edit:
            yield self.model
            return
        plan, projections = self._plan(edit), self.projections
        with self.nn.edit(inplace=True) as tracer:
            for _ in tracer.all():
                _run(projections, plan)
        try:
            yield EditedModel(self.model, self.nn)
        finally:
            self.nn.clear_edits()


def _run(projections: list[Any], plan: dict[int, list[_Step]]) -> None:
    for layer in sorted(plan):
        heads_out = projections[layer].input  # (B, T, heads * head_dim): the heads side by side
        for step in plan[layer]:
            if step.vector is None:
                heads_out[:, :, step.columns] *= step.alpha
            else:
                heads_out[:, :, step.columns] = step.vector


class EditedModel:
    """Stands in for the model while an edit is stored: ``__call__`` and ``generate`` run
    through the nnsight wrapper (so the edit applies); everything else is the model's."""

    def __init__(self, model: torch.nn.Module, envoy: Any) -> None:
        self._model = model
        self._envoy = envoy

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with _loop_end_quiet():
            return self._envoy.trace(*args, trace=False, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with _loop_end_quiet():
            return self._envoy.trace(*args, fn="generate", trace=False, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


@contextmanager
def _loop_end_quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_LOOP_END, category=UserWarning)
        yield
