"""`mechhi ground`: training-free grounding of a store's samples by each probe's top heads.

The question Kang et al. (CVPR 2025) answer with it: do a few heads' maps find the object?
Here it sets their choice of heads (spatial entropy: focused maps, never the object's
mask) against the store's other probes' choices (Head Impact, attention-mass lift) with
as many heads each, on the same samples and the same grounding rule
(`probes.grounding`), beside the whole image as the region (what no head at all gets).
Reads the store only; nothing is written.

>>> result = ground_store(open_store("stores/toy.zarr"))   # doctest: +SKIP
>>> [(g["by"], g["box_accuracy"]) for g in result["groundings"]]   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import xarray as xr

from mechhi.scoring.head_sets import top_heads
from mechhi.scoring.probe_scores import probe_scores
from probes.grounding import ground, whole_image
from probes.head_impact import BinarizeRule
from probes.registry import get_probe, probe_names
from probes.spatial_entropy import chosen_heads, localization, select_heads

GROUND_BY = probe_names(model=False)  # the probes that read the store alone (probes.registry)


def ground_store(
    ds: xr.Dataset,
    by: Sequence[str] = ("spatial-entropy", "head-impact"),
    *,
    n_heads: int | None = None,
    smooth: float = 0.0,
    per_sample_k: int | None = None,
    mask_threshold: float = 0.5,
    keep_best: bool = True,
) -> dict[str, Any]:
    """Ground every traced sample by each probe's top heads -> a JSON-ready dict.

    ``n_heads``: heads per probe (default: as many as spatial entropy chooses at its
    elbow; spatial entropy then uses exactly its chosen heads). The object's tokens follow
    Head Impact's mask rule (``mask_threshold``, ``keep_best``)."""
    unknown = [b for b in by if b not in GROUND_BY]
    if unknown or not by:
        raise ValueError(f"--by {','.join(by)}: choose one or more of {', '.join(GROUND_BY)}")
    rule = BinarizeRule(mask_threshold=mask_threshold, keep_best_token=keep_best)
    selection = select_heads(localization(ds), per_sample_k)
    n = n_heads or int(selection.attrs["n_selected"])
    if n < 1:
        raise ValueError(
            "spatial entropy chose no head (no sample attends above the mean anywhere): give --n-heads"
        )
    groundings = []
    for probe in by:
        if probe == "spatial-entropy":
            heads = chosen_heads(selection, n_heads)
        else:
            heads = list(top_heads(probe_scores(ds, [probe], progress=False)[get_probe(probe).variable], n))
        result = ground(ds, heads, smooth, rule)
        groundings.append({"by": probe, **result.attrs})
    overlap = [
        {
            "by": a["by"],
            "other": b["by"],
            "shared": len({tuple(h) for h in a["heads"]} & {tuple(h) for h in b["heads"]}),
        }
        for i, a in enumerate(groundings)
        for b in groundings[i + 1 :]
    ]
    return {
        "store_model": ds.attrs.get("model"),
        "samples_done": int(ds["done"].sum()),
        "n_heads": n,
        "smooth": float(smooth),
        "mask_rule": rule.to_dict(),
        "selection": dict(selection.attrs),
        "groundings": groundings,
        "overlap": overlap,
        "whole_image": {k: v for k, v in whole_image(ds, rule).attrs.items() if k not in ("heads", "smooth")},
    }
