"""Which decoder layers get adapters: read from a store's Head Impact ranking, never
recomputed on the side, with the provenance of the choice (store, model, dataset, a
fingerprint of the head_impact values).

>>> select_layers("stores/toy.zarr", "top-4").layers        # doctest: +SKIP
(3, 5, 6, 9)
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from mechhi.finetune.depth import DEFAULT_BAND, depth_matched
from mechhi.store import open_store
from mechhi.store.schema import relative_depth
from probes.head_impact import layer_ranking


class SelectionError(ValueError):
    """A layer-selection spec or store that cannot give the layers asked for."""


@dataclass(frozen=True)
class Selection:
    """The chosen decoder layers and where the choice came from."""

    spec: str
    layers: tuple[int, ...]  # ascending
    provenance: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"spec": self.spec, "layers": list(self.layers), "provenance": self.provenance}


_SPEC = re.compile(r"^(?:(top|bottom|random|depth)-(\d+)|full|layers=(\d+(?:,\d+)*))$")


def parse_spec(spec: str) -> tuple[str, int | tuple[int, ...] | None]:
    """'top-4' -> ('top', 4); 'full' -> ('full', None); 'layers=3,7' -> ('layers', (3, 7))."""
    match = _SPEC.match(spec.replace(" ", ""))
    if not match:
        raise SelectionError(
            f"layer selection {spec!r}: use top-K, bottom-K, random-K, depth-K, full or layers=3,7"
        )
    kind, k, listed = match.groups()
    if kind:
        if int(k) < 1:
            raise SelectionError(f"layer selection {spec!r}: K must be at least 1")
        return kind, int(k)
    if listed:
        return "layers", tuple(sorted({int(x) for x in listed.split(",")}))
    return "full", None


def head_impact_fingerprint(head_impact: xr.DataArray) -> str:
    """sha256 (16 hex) of the (layer, head) values: says which ranking an adapter came from."""
    values = np.ascontiguousarray(head_impact.transpose("layer", "head").values, dtype=np.float64)
    digest = hashlib.sha256(repr(values.shape).encode() + values.tobytes())
    return digest.hexdigest()[:16]


def _store_provenance(ds: xr.Dataset, source: str | os.PathLike | None) -> dict[str, Any]:
    source = source or ds.encoding.get("source")  # xarray records the path it opened
    return {
        "store": str(Path(source).resolve()) if source else None,
        "model": ds.attrs.get("model"),
        "dataset": ds.attrs.get("dataset"),
    }


def _ranked_layers(ds: xr.Dataset) -> tuple[list[int], list[float], str]:
    """Finite-ranked layers (best first), their mean HI, and the values' fingerprint."""
    if "head_impact" not in ds.data_vars:
        raise SelectionError(
            "the store has no head_impact variable: score it first (`mechhi rank --store S` or "
            "`mechhi stats --store S` writes it); mechhi does not re-score a store silently"
        )

    hi = ds["head_impact"].compute()
    ranking = layer_ranking(xr.Dataset({"head_impact": hi}))
    finite = np.isfinite(ranking.values)
    layers = [int(x) for x in ranking.layer.values[finite]]
    return layers, [float(x) for x in ranking.values[finite]], head_impact_fingerprint(hi)


def _open(store: xr.Dataset | str | os.PathLike) -> tuple[xr.Dataset, str | None]:
    """(dataset, the path it came from when known)."""
    if isinstance(store, xr.Dataset):
        return store, None

    return open_store(store), str(store)


def traced_samples(ds: xr.Dataset) -> tuple[int, int] | None:
    """(samples traced, samples in the store): what a ranking rests on (None: no ``done`` flags)."""
    if "done" not in ds.data_vars:
        return None
    return int(ds["done"].sum()), int(ds.sizes["sample"])


def _layer_depth(ds: xr.Dataset) -> Callable[[int], float]:
    """The store's relative depth of a layer (``depth`` coordinate, else layer / (n - 1))."""
    values = ds["depth"].values if "depth" in ds.coords else relative_depth(ds.sizes["layer"])
    table = dict(zip((int(x) for x in ds["layer"].values), (float(v) for v in values)))
    return table.__getitem__


def select_layers(
    store_ds: xr.Dataset | str | os.PathLike, spec: str, *, seed: int = 0, depth_band: float = DEFAULT_BAND
) -> Selection:
    """The decoder layers a spec picks from a store's Head Impact ranking.

    ``top-K`` / ``bottom-K``: the K layers of highest / lowest mean HI over heads (ties
    keep the lower layer index on top); ``random-K``: K layers drawn (seeded) from the
    layers in neither top-K nor bottom-K; ``depth-K``: for each top-K layer one drawn
    (seeded) from the non-top-K layers of near depth (`mechhi.finetune.depth`, band
    ``depth_band``); ``full``: every layer; ``layers=3,7``: those. Layers whose mean HI
    is NaN are never ranked.

    >>> select_layers("stores/toy.zarr", "top-4").layers        # doctest: +SKIP
    (3, 5, 6, 9)
    """
    ds, source = _open(store_ds)
    kind, arg = parse_spec(spec)
    provenance = _store_provenance(ds, source)
    counts = traced_samples(ds)
    if counts is not None:
        provenance["traced_samples"], provenance["store_samples"] = counts
    if kind in ("full", "layers"):
        return _listed(ds, spec, kind, arg, provenance)
    ranked, scores, fingerprint = _ranked_layers(ds)
    k = int(arg)  # type: ignore[arg-type]
    need = {"random": 3 * k, "depth": 2 * k}.get(kind, k)
    if len(ranked) < need:
        what = {"random": "top-K, bottom-K and random-K disjoint", "depth": "depth-K apart from top-K"}.get(
            kind, "them"
        )
        raise SelectionError(
            f"layer selection {spec!r} needs {need} ranked layers to keep {what}; "
            f"the store ranks {len(ranked)}"
        )
    layers = _ranked_pick(ds, kind, k, ranked, seed, depth_band, provenance)
    provenance.update(
        head_impact_fingerprint=fingerprint,
        ranking=[{"layer": layer, "mean_head_impact": s} for layer, s in zip(ranked, scores)],
    )
    return Selection(spec, tuple(sorted(layers)), provenance)


def _listed(ds: xr.Dataset, spec: str, kind: str, arg: Any, provenance: dict[str, Any]) -> Selection:
    """``full`` or ``layers=...``: no ranking needed, checked against the store's layers."""
    all_layers = [int(x) for x in ds["layer"].values]
    layers = all_layers if kind == "full" else list(arg)
    missing = sorted(set(layers) - set(all_layers))
    if missing:
        raise SelectionError(
            f"layer selection {spec!r}: layers {missing} not in the store (0..{max(all_layers)})"
        )
    if "head_impact" in ds.data_vars:
        provenance["head_impact_fingerprint"] = head_impact_fingerprint(ds["head_impact"].compute())
    return Selection(spec, tuple(sorted(layers)), provenance)


def _ranked_pick(
    ds: xr.Dataset, kind: str, k: int, ranked: list[int], seed: int, band: float, provenance: dict[str, Any]
) -> list[int]:
    """top / bottom / random / depth K layers from the ranking (best first); notes the draw."""
    top, bottom = ranked[:k], ranked[-k:]
    if kind == "top":
        return top
    if kind == "bottom":
        return bottom
    if kind == "random":
        pool = sorted(set(ranked) - set(top) - set(bottom))  # (len(ranked) - 2k,)
        provenance["random_seed"] = seed
        return [int(x) for x in np.random.default_rng(seed).choice(pool, size=k, replace=False)]
    pool = sorted(set(ranked) - set(top))
    pairs = depth_matched(top, pool, depth=_layer_depth(ds), band=band, seed=seed)
    provenance.update(depth_seed=seed, depth_band=band, depth_pairs=pairs)
    return [p["layer"] for p in pairs]


def selection_without_store(spec: str, n_layers: int) -> Selection:
    """``full`` or ``layers=...`` for a model without a store (no ranking needed)."""
    kind, arg = parse_spec(spec)
    if kind not in ("full", "layers"):
        raise SelectionError(f"layer selection {spec!r} ranks layers: give a scored store (--store S)")
    layers = list(range(n_layers)) if kind == "full" else list(arg)  # type: ignore[arg-type]
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise SelectionError(f"layer selection {spec!r}: layers {bad} outside the model's 0..{n_layers - 1}")
    return Selection(spec, tuple(sorted(layers)), {"store": None})
