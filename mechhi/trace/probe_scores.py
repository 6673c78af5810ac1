"""Every probe's score for every head of one store, side by side.

Head Impact, the attention-mass lift and spatial entropy are read from the store's maps; Head Pursuit and
the logit lens need each head's write, so the store's own model is run on the store's
own samples (its dataset, split and prompt, from the store's attrs). One pass of head
writes feeds both. What `mechhi rank --compare-probes` correlates and what
`mechhi ablate --probe` picks heads by.

Scores, one (layer, head) variable per probe, higher = the probe thinks the head matters
more for the image: ``head_impact`` (mean IoU), ``attention_mass`` (object lift),
``spatial_entropy`` (how often the head is among a sample's most focused image-attending
heads, Kang et al. 2025's selection frequency; it never sees the object's mask), ``pursuit`` (SOMP explained variance of the concept), ``logit_lens`` (mean direct
logit of the concept's words).

>>> scores = probe_scores(open_store("stores/toy.zarr"))        # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xarray as xr

from ..models import VLMAdapter
from ..toyworld.world import COLOURS

PROBES = ("head-impact", "attention-mass", "spatial-entropy", "pursuit", "logit-lens")
NEED_MODEL = ("pursuit", "logit-lens")


@dataclass(frozen=True)
class ModelProbeSettings:
    """How Head Pursuit and the logit lens read the heads (defaults of `mechhi pursuit`)."""

    words: tuple[str, ...] = field(default_factory=lambda: tuple(COLOURS))  # the concept
    k: int = 3  # SOMP steps
    positions: str = "image"  # average each head's write over the image tokens
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"


def variable(probe: str) -> str:
    """The score's variable name: ``head-impact`` -> ``head_impact``."""
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; choose from {', '.join(PROBES)}")
    return probe.replace("-", "_")


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
    from ..bundled import local_path
    from ..data.format import load_dataset
    from ..store.dataset_ref import DatasetRef

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
        raise ValueError(f"the store's dataset {changed} changed since it was traced (fingerprint differs): "
                         "retrace it")  # fmt: skip
    raise ValueError(f"the store's dataset {ref.where} is not on this machine"
                     + ("" if recorded.is_absolute() else " (looked here and beside the store)"))


def store_samples(ds: xr.Dataset, adapter: VLMAdapter) -> list[Any]:
    """The dataset samples the store holds, in its order (a store traced with --limit holds
    the first N), checked against the store's image ids and descriptions."""
    from .job import TraceConfig, load_samples

    path, split, _ = store_source(ds)
    samples = load_samples(TraceConfig(dataset=path, split=split), adapter).samples[: ds.sizes["sample"]]
    ids = [(s.image_id, s.description) for s in samples]
    if ids != list(zip(ds["image_id"].values.tolist(), ds["description"].values.tolist())):
        raise ValueError(f"the store's samples are not the first {ds.sizes['sample']} of {path} (split {split})")
    return samples


def _store_scores(ds: xr.Dataset, probes: Sequence[str]) -> dict[str, xr.DataArray]:
    out: dict[str, xr.DataArray] = {}
    if "head-impact" in probes:
        if "head_impact" in ds.data_vars and not bool(ds.head_impact.isnull().all()):
            out["head_impact"] = ds["head_impact"].compute()
        else:
            from probes.head_impact import score

            out["head_impact"] = score(ds)["head_impact"]
    if "attention-mass" in probes:
        from probes.attention_mass import attention_mass, head_means

        out["attention_mass"] = head_means(attention_mass(ds))["object_lift"]
    if "spatial-entropy" in probes:
        from probes.spatial_entropy import localization, select_heads

        out["spatial_entropy"] = select_heads(localization(ds))["selection_frequency"]
    return out


def _model_scores(ds: xr.Dataset, probes: Sequence[str], settings: ModelProbeSettings, loaded: Any,
                  progress: bool) -> dict[str, xr.DataArray]:  # fmt: skip
    from probes.head_pursuit import pursue_heads
    from probes.logit_lens import logit_lens

    from ..models.loading import load
    from .pursuit_job import PursuitConfig, pursuit_inputs

    path, split, template = store_source(ds)
    loaded = loaded or load(str(ds.attrs.get("model")), device=settings.device, dtype=settings.dtype)
    store_samples(ds, loaded[1])  # the store's samples are still the dataset's first N
    config = PursuitConfig(model=str(ds.attrs.get("model")), dataset=path, words=settings.words, k=settings.k,
                           positions=settings.positions, limit=ds.sizes["sample"], batch_size=settings.batch_size,
                           device=settings.device, dtype=settings.dtype, template=template, split=split)  # fmt: skip
    signals, dictionary = pursuit_inputs(config, progress=progress, loaded=loaded)
    out = {}
    if "pursuit" in probes:
        out["pursuit"] = pursue_heads(signals, dictionary, list(settings.words), settings.k,
                                      control_draws=0)["explained"]  # a ranking: no chance reference needed
    if "logit-lens" in probes:
        out["logit_lens"] = logit_lens(signals, dictionary, settings.words)["mean_logit"]
    return out


def probe_scores(
    ds: xr.Dataset, probes: Sequence[str] = PROBES, *, settings: ModelProbeSettings = ModelProbeSettings(),
    loaded: tuple[Any, VLMAdapter] | None = None, progress: bool = True,
) -> xr.Dataset:  # fmt: skip
    """(layer, head) scores of ``probes`` for the store ``ds``; see the module doc.

    ``loaded`` passes the store's (model, adapter) already loaded; otherwise the model is
    loaded from the store's ``model`` attr, and only if a probe needs it.
    """
    for probe in probes:
        variable(probe)
    scores = _store_scores(ds, probes)
    if any(p in probes for p in NEED_MODEL):
        scores.update(_model_scores(ds, probes, settings, loaded, progress))
    coords = {"layer": ds["layer"].values, "head": ds["head"].values}
    if "depth" in ds.coords:
        coords["depth"] = ("layer", ds["depth"].values)
    data = {variable(p): (("layer", "head"), scores[variable(p)].transpose("layer", "head").values) for p in probes}
    return xr.Dataset(data, coords=coords, attrs={"words": list(settings.words), "k": settings.k,
                                                   "positions": settings.positions})  # fmt: skip
