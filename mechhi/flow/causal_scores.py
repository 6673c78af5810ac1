"""The causal results already written beside a store, as probe scores for `rank --compare-probes`.

`mechhi patch` leaves one labelled zarr per (method, change) in ``<store>.patch``: exact
activation patching and its attribution estimate, an effect per (layer, head). `mechhi
knockout` leaves a report of (pair, window) changes; with one-layer windows its
``image->description`` row (or another pair) is a per-layer causal score. They are read, never
run here: a causal run is minutes to hours, so `rank --compare-probes` takes what exists
and says, in one line each, how to make what does not.

Scores are "higher = the unit matters more for the answer": the patching effect as is
(share of the clean-corrupted logit gap a head restores), the knockout's *drop* in the
answer's log-probability (minus the change). Knockout has no head dimension: it joins the
layer-level agreement only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from mechhi.flow.patch_job import PatchConfig, open_result

CAUSAL_PROBES = ("patching", "attribution", "knockout")
_METHOD = {"patching": "exact", "attribution": "attribution"}


def patch_result(store: Path, method: str, change: str | None) -> Path | None:
    """``<store>.patch/patch-<method>-<change>-heads-all.zarr``; with no ``change``, the
    only one there (several changes and none chosen: None, the caller asks for one)."""
    folder = PatchConfig().out_dir(Path(store))
    found = sorted(folder.glob(f"patch-{method}-{change or '*'}-heads-all.zarr"))
    return found[0] if len(found) == 1 else None


def knockout_layer_scores(report: dict[str, Any], pair: str, metric: str = "answer_logprob") -> xr.DataArray:
    """The drop in ``metric`` when ``pair`` is knocked out in one layer at a time, per layer."""
    rows = [r for r in report.get("rows", []) if r.get("pair") == pair]
    if not rows:
        raise ValueError(
            f"the knockout report has no pair {pair!r}; it has {', '.join(report.get('pairs', []))}"
        )
    if any(len(r["layers"]) != 1 for r in rows):
        raise ValueError(
            "the knockout report's windows span several layers: rerun `mechhi knockout --window 1` "
            "for a per-layer score"
        )
    values = np.full(int(report["n_layers"]), np.nan)
    for row in rows:
        change = row["change"][metric]["mean"]
        values[row["layers"][0]] = np.nan if change is None else -float(change)
    return xr.DataArray(values, dims=("layer",), coords={"layer": np.arange(len(values))})


def causal_scores(
    ds: xr.Dataset,
    store: Path,
    *,
    change: str | None = None,
    knockout: Path | None = None,
    knockout_pair: str = "image->description",
) -> tuple[dict[str, xr.DataArray], list[str]]:
    """(score per probe found, one note per probe missing) for the store ``ds`` at ``store``."""
    scores: dict[str, xr.DataArray] = {}
    notes: list[str] = []
    for probe, method in _METHOD.items():
        path = patch_result(store, method, change)
        if path is None:
            notes.append(
                f"{probe}: no single `patch-{method}-{change or '<change>'}` result in "
                f"{PatchConfig().out_dir(Path(store))} (`mechhi patch --store {store} --method both"
                f"{' --change ' + change if change else ''}` makes it)"
            )
            continue
        result = open_result(path)
        if (result.sizes["layer"], result.sizes["head"]) != (ds.sizes["layer"], ds.sizes["head"]):
            raise ValueError(
                f"{path} has {result.sizes['layer']} x {result.sizes['head']} heads, the store "
                f"{ds.sizes['layer']} x {ds.sizes['head']}: patched on another model"
            )
        scores[probe] = (
            result["effect"].load().assign_coords(layer=ds["layer"].values, head=ds["head"].values)
        )
    if knockout is None:
        notes.append(
            f'knockout: not given (`mechhi knockout --store {store} --window 1 --pairs "{knockout_pair}"` '
            "then --knockout DIR/knockout.json)"
        )
    else:
        path = Path(knockout)
        if not path.is_file():
            raise ValueError(f"--knockout {path}: no such file")
        report = json.loads(path.read_text())
        if int(report.get("n_layers", -1)) != ds.sizes["layer"]:
            raise ValueError(
                f"--knockout {path} ran on a model of {report.get('n_layers')} layers, the store has "
                f"{ds.sizes['layer']}"
            )
        scores["knockout"] = knockout_layer_scores(report, knockout_pair).assign_coords(
            layer=ds["layer"].values
        )
    return scores, notes
