"""What the intervention jobs share: the store they read, the model they load (only when
some setup still has to run), its head editor, and the reference means for mean ablation.

A rerun whose setups are all cached never loads the model: ``Session.model`` loads it on
first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import xarray as xr

from mechhi.devices import resolve_device, resolve_dtype
from mechhi.intervene.heads import Head, HeadEdit, HeadEditor
from mechhi.intervene.reference import head_means
from mechhi.models import VLMAdapter
from mechhi.models.loading import load
from mechhi.scoring.probe_scores import store_samples, store_source
from mechhi.store import open_store
from mechhi.trace.trace_dataset import TraceConfig

MODES = ("zero", "mean")


def default_store() -> Path:
    """Where `mechhi trace` writes by default: the store every command reads by default."""
    return TraceConfig().store_path()


@dataclass
class Session:
    """One job's store, model and editor; ``loaded`` short-cuts the model load (tests)."""

    store: Path
    model_id: str | None = None  # default: the store's model
    device: str = "auto"
    dtype: str = "auto"
    loaded: tuple[Any, VLMAdapter] | None = None
    progress: bool = True

    @cached_property
    def ds(self) -> xr.Dataset:
        if not self.store.exists():
            raise FileNotFoundError(f"no store at {self.store}: run `mechhi trace` first (or pass --store)")
        return open_store(self.store)

    @property
    def model_name(self) -> str:
        return self.model_id or str(self.ds.attrs.get("model"))

    @property
    def numerics(self) -> str:
        """The dtype and device the model runs in, resolved without loading it (part of every cache key)."""
        device = resolve_device(self.device)
        return f"{resolve_dtype(self.dtype, device)}@{device.type}"

    @cached_property
    def model(self) -> tuple[Any, VLMAdapter]:
        """The model, refused unless it has the store's layers and heads: the store's
        scores pick heads by (layer, head), which mean nothing in a model of another shape."""
        if self.loaded is not None:
            loaded = self.loaded
        else:
            loaded = load(self.model_name, device=self.device, dtype=self.dtype)
        check_shape(self.ds, self.store, self.model_name, loaded[1])
        return loaded

    @cached_property
    def editor(self) -> HeadEditor:
        return HeadEditor(*self.model)

    def store_fields(self) -> dict[str, Any]:
        """What identifies the store's content in a cache key."""
        attrs = self.ds.attrs
        return {
            "store": str(self.store.resolve()),
            "created": attrs.get("created"),
            "dataset": attrs.get("dataset"),
            "binarize": attrs.get("binarize"),
            "done": int(self.ds["done"].sum()),
        }

    @cached_property
    def reference_means(self) -> xr.DataArray:
        """Each head's mean output over the store's own samples (mean ablation's reference)."""
        model, adapter = self.model
        return head_means(model, adapter, store_samples(self.ds, adapter), template=store_source(self.ds)[2])

    def reference_fields(self, mode: str) -> dict[str, Any]:
        """What the mean-ablation reference depends on (nothing for zero ablation)."""
        if mode != "mean":
            return {}
        return {
            "reference": self.ds.attrs.get("dataset"),
            "template": self.ds.attrs.get("prompt_template"),
            "reference_samples": self.ds.sizes["sample"],
        }

    def ablation(self, heads: tuple[Head, ...], mode: str) -> HeadEdit:
        """``heads`` zeroed or replaced by their reference means."""
        if mode not in MODES:
            raise ValueError(f"unknown ablation mode {mode!r}; choose from {', '.join(MODES)}")
        if mode == "zero" or not heads:
            return HeadEdit.scaled(heads, 0.0)
        return HeadEdit.mean_ablated(heads, self.reference_means)


def check_shape(ds: xr.Dataset, store: Path, model_name: str, adapter: VLMAdapter) -> None:
    """Refuse a model whose layers x heads are not the store's, saying both."""
    stored = (ds.sizes["layer"], ds.sizes["head"])
    model = (adapter.n_layers, adapter.n_heads)
    if stored != model:
        raise ValueError(
            f"the store {store} and the model {model_name} disagree: the store has {stored[0]} "
            f"layers x {stored[1]} heads ({ds.attrs.get('model')}), the model {model[0]} x {model[1]}; "
            "pass the store's model, or trace a store with this one"
        )
