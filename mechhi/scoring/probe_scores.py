"""Every probe's score for every head of one store, side by side.

Each probe is taken from the registry (`probes.registry`) and given what it needs:
Head Impact, the attention-mass lift and spatial entropy read the store's maps; Head
Pursuit and the logit lens need each head's write, so the store's own model is run on the store's
own samples (its dataset, split and prompt, from the store's attrs). One pass of head
writes feeds both. What `mechhi rank --compare-probes` correlates and what
`mechhi ablate --probe` picks heads by.

Scores, one (layer, head) variable per probe, higher = the probe thinks the head matters
more for the image: ``head_impact`` (mean IoU), ``attention_mass`` (object lift),
``spatial_entropy`` (how often the head is among a sample's most focused image-attending
heads, Kang et al. 2025's selection frequency; it never sees the object's mask),
``pursuit`` (SOMP explained variance of the concept), ``logit_lens`` (mean direct
logit of the concept's words).

>>> scores = probe_scores(open_store("stores/toy.zarr"))        # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xarray as xr

from mechhi.bundled import local_path
from mechhi.data.format import load_dataset
from mechhi.models import VLMAdapter
from mechhi.models.loading import load
from mechhi.scoring.pursuit import PursuitConfig, pursuit_inputs
from mechhi.store.dataset_ref import DatasetRef
from mechhi.trace.trace_dataset import TraceConfig, load_samples
from probes.registry import get_probe, probe_names


@dataclass(frozen=True)
class ModelProbeSettings:
    """How Head Pursuit and the logit lens read the heads (defaults of `mechhi pursuit`)."""

    words: tuple[str, ...] = ()  # the concept: no default, a library knows no world's words
    k: int = 3  # SOMP steps
    positions: str = "image"  # average each head's write over the image tokens
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"


def store_source(ds: xr.Dataset) -> tuple[str, str, str]:
    """(dataset directory, split, prompt template) the store was traced on, from its attrs."""
    split, template = str(ds.attrs.get("split") or "all"), str(ds.attrs.get("prompt_template") or "caption")
    return str(store_dataset(ds)), split, template


def store_dataset(ds: xr.Dataset) -> Path:
    """The directory of the store's dataset on this machine, checked by its content fingerprint.

    A store records the resolved path (`mechhi.store.dataset_ref`); one of an earlier
    version may hold a path relative to where `mechhi trace` ran, so a relative path is also
    looked for under the store's folder and each folder above it, and the first candidate
    with the recorded fingerprint is taken (a directory of other content is never used)."""
    if not ds.attrs.get("dataset"):
        raise ValueError("the store records no dataset (attrs 'dataset'): cannot rerun its samples")
    ref = DatasetRef.parse(ds.attrs["dataset"])
    recorded = Path(local_path(ref.where))
    candidates = [recorded]
    source = ds.encoding.get("source")
    if not recorded.is_absolute() and source:
        candidates += [folder / recorded for folder in Path(source).resolve().parents]
    changed = None
    for candidate in dict.fromkeys(c for c in candidates if c.is_dir()):
        held = ref.fingerprint and load_dataset(candidate, skip_bad=True, check_images=False).fingerprint
        if held == ref.fingerprint:
            return candidate
        changed = changed or candidate
    if changed is not None:
        raise ValueError(
            f"the store's dataset {changed} changed since it was traced (fingerprint differs): retrace it"
        )
    raise ValueError(
        f"the store's dataset {ref.where} is not on this machine"
        + ("" if recorded.is_absolute() else " (looked here and beside the store)")
    )


def store_samples(ds: xr.Dataset, adapter: VLMAdapter) -> list[Any]:
    """The dataset samples the store holds, in its order (a store traced with --limit holds
    the first N), checked against the store's image ids and descriptions."""
    path, split, _ = store_source(ds)
    samples = load_samples(TraceConfig(dataset=path, split=split), adapter).samples[: ds.sizes["sample"]]
    ids = [(s.image_id, s.description) for s in samples]
    if ids != list(zip(ds["image_id"].values.tolist(), ds["description"].values.tolist())):
        raise ValueError(
            f"the store's samples are not the first {ds.sizes['sample']} of {path} (split {split})"
        )
    return samples


class _Inputs:
    """What the probes read for one store (`probes.registry.ProbeInputs`): the store, and
    the head writes of its model on its samples, run once, on first use, for every probe
    that needs them."""

    def __init__(self, ds: xr.Dataset, settings: ModelProbeSettings, loaded: Any, progress: bool) -> None:
        self.ds, self.words, self.k = ds, tuple(settings.words), settings.k
        self._settings, self._loaded, self._progress = settings, loaded, progress
        self._writes: tuple[xr.DataArray, Any] | None = None

    def head_writes(self) -> tuple[xr.DataArray, Any]:
        if self._writes is None:
            self._writes = self._run()
        return self._writes

    def _run(self) -> tuple[xr.DataArray, Any]:
        ds, settings = self.ds, self._settings
        if not settings.words:
            raise ValueError("a probe that reads head writes needs a concept's words (--words)")
        path, split, template = store_source(ds)
        loaded = self._loaded or load(
            str(ds.attrs.get("model")), device=settings.device, dtype=settings.dtype
        )
        store_samples(ds, loaded[1])  # the store's samples are still the dataset's first N
        config = PursuitConfig(
            model=str(ds.attrs.get("model")),
            dataset=path,
            words=settings.words,
            k=settings.k,
            positions=settings.positions,
            limit=ds.sizes["sample"],
            batch_size=settings.batch_size,
            device=settings.device,
            dtype=settings.dtype,
            template=template,
            split=split,
        )
        return pursuit_inputs(config, progress=self._progress, loaded=loaded)


def probe_scores(
    ds: xr.Dataset,
    probes: Sequence[str] | None = None,
    *,
    settings: ModelProbeSettings = ModelProbeSettings(),
    loaded: tuple[Any, VLMAdapter] | None = None,
    progress: bool = True,
) -> xr.Dataset:
    """(layer, head) scores of ``probes`` for the store ``ds``; see the module doc.

    ``loaded`` passes the store's (model, adapter) already loaded; otherwise the model is
    loaded from the store's ``model`` attr, and only if a probe needs it. ``probes``:
    default every registered probe (`probes.registry`), in its order, read at the call so
    that a probe registered after import is included.
    """
    chosen = [get_probe(name) for name in (probe_names() if probes is None else probes)]
    inputs = _Inputs(ds, settings, loaded, progress)
    scores = {probe.variable: probe.score(inputs) for probe in chosen}
    coords = {"layer": ds["layer"].values, "head": ds["head"].values}
    if "depth" in ds.coords:
        coords["depth"] = ("layer", ds["depth"].values)
    data = {
        name: (("layer", "head"), score.transpose("layer", "head").values) for name, score in scores.items()
    }
    return xr.Dataset(
        data,
        coords=coords,
        attrs={"words": list(settings.words), "k": settings.k, "positions": settings.positions},
    )
