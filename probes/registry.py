"""Every probe by name: what it needs and how it scores a head.

A probe is one file of this package that ends by registering itself (peft's
``register_peft_method``): its name, what it needs (``store``: the store's maps;
``model``: each head's write, from the store's model run on the store's samples;
``words``: a concept's words), a one-line summary, and ``score(inputs)`` returning one
(layer, head) DataArray, higher = the probe thinks the head matters more for the image.
The CLI (`rank`, `ablate --probe`, `rank --compare-probes`), `mechhi ground` and the
report list probes from here, so a new probe is one file (and its test) plus its line
in `PROBE_MODULES`, which fixes the order they are shown in and lets the CLI name them
without importing them (`mechhi --help` stays fast; a probe is imported when used).
Code outside mechhi registers its own with `register_probe`.

What a probe needs is handed to it by whoever runs it (`mechhi.scoring.probe_scores`
for a store): this package never runs a model, so it stays below `mechhi.trace`.

>>> from probes.registry import get_probe, probe_names
>>> probe_names(model=False)                                  # doctest: +SKIP
('head-impact', 'attention-mass', 'spatial-entropy')
>>> get_probe("pursuit").needs                                 # doctest: +SKIP
('model', 'words')
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # annotations only: naming the probes must not import xarray (`mechhi --help`)
    import numpy as np
    import xarray as xr

NEEDS = ("store", "model", "words")


class ProbeInputs(Protocol):
    """What a probe may read; the runner computes the model's part once, on first use."""

    ds: xr.Dataset  # the store
    words: tuple[str, ...]  # the concept (probes that need words)
    k: int  # SOMP steps (Head Pursuit)

    def head_writes(self) -> tuple[xr.DataArray, np.ndarray]:
        """(signals (sample, layer, head, d_model), the words' unembedding rows (n_words, d_model))."""
        ...


@dataclass(frozen=True)
class Probe:
    name: str  # as the CLI spells it: "head-impact"
    needs: tuple[str, ...]  # a subset of NEEDS
    summary: str  # one line, for --help and the report
    score: Callable[[ProbeInputs], xr.DataArray]  # (layer, head) scores, higher = matters more

    def __post_init__(self) -> None:
        unknown = set(self.needs) - set(NEEDS)
        if unknown:
            raise ValueError(
                f"probe {self.name!r}: unknown needs {sorted(unknown)}; choose from {', '.join(NEEDS)}"
            )

    @property
    def variable(self) -> str:
        """The score's variable name: ``head-impact`` -> ``head_impact``."""
        return self.name.replace("-", "_")

    @property
    def needs_model(self) -> bool:
        return "model" in self.needs


# The built-in probes: name -> the module whose ``PROBE`` it is, in the order shown.
PROBE_MODULES = {
    "head-impact": "probes.head_impact",
    "attention-mass": "probes.attention_mass",
    "spatial-entropy": "probes.spatial_entropy",
    "pursuit": "probes.head_pursuit",
    "logit-lens": "probes.logit_lens",
}
_PROBES: dict[str, Probe] = {}


def _loaded(name: str) -> Probe:
    if name not in _PROBES:
        probe = importlib.import_module(PROBE_MODULES[name]).PROBE
        if probe.name != name:
            raise ValueError(f"{PROBE_MODULES[name]} defines probe {probe.name!r}, listed as {name!r}")
    return _PROBES[name]


def register_probe(probe: Probe) -> Probe:
    """Add ``probe``; a second probe of the same name is refused (one name, one method)."""
    if probe.name in _PROBES and _PROBES[probe.name] is not probe:
        raise ValueError(f"a probe named {probe.name!r} is already registered")
    _PROBES[probe.name] = probe
    return probe


def probe_names(*, model: bool | None = None) -> tuple[str, ...]:
    """Probe names, built-in first; ``model=False``: only those that read the store alone,
    ``True``: only those that need the model run (these import the probes)."""
    names = tuple(dict.fromkeys([*PROBE_MODULES, *_PROBES]))
    return tuple(name for name in names if model is None or _loaded(name).needs_model == model)


def get_probe(name: str, *, model: bool | None = None) -> Probe:
    """The probe ``name``, or a one-line error listing the ones there are."""
    names = probe_names(model=model)
    if name not in names:
        raise ValueError(f"unknown probe {name!r}; available: {', '.join(names)}")
    return _loaded(name)
