"""Do the probes agree? Rank correlations between their head (and layer) rankings.

Head Impact, the attention-mass lift, spatial entropy, Head Pursuit and the logit lens each
rank the same heads by a different idea of "this head matters for the image" (where it
looks, how much of its look lands on the object, what it writes); activation patching, its
attribution estimate and attention knockout by what the answer loses without it. If they
rank heads alike, they measure one thing; if not, choosing heads "by the probe" depends on
the probe. Spearman's rho (ranks, linear) and Kendall's tau-b (pairs in the same order)
come from scipy, each with
its p-value, over the heads both probes score (NaN dropped pairwise); at the ``layer``
level each probe's scores are first averaged over heads, as the layer rankings do.

>>> agreement(scores)                        # scores: (layer, head), one variable per probe  # doctest: +SKIP
<xarray.Dataset> Dimensions: (level: 2, probe: 4, other: 4) ...
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import xarray as xr
from scipy import stats

from probes.maps import mean_over

LEVELS = ("head", "layer")


def _correlations(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float, float, int]:
    """(rho, p, tau, p, n) over the finite pairs of two 1-D arrays."""
    keep = np.isfinite(a) & np.isfinite(b)
    n = int(keep.sum())
    if n < 3 or np.ptp(a[keep]) == 0 or np.ptp(b[keep]) == 0:
        return np.nan, np.nan, np.nan, np.nan, n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = stats.spearmanr(a[keep], b[keep])
        tau = stats.kendalltau(a[keep], b[keep])
    return float(rho.statistic), float(rho.pvalue), float(tau.statistic), float(tau.pvalue), n


def _units(scores: xr.Dataset, level: str) -> dict[str, np.ndarray]:
    """Each probe's scores as a flat array over heads (layer-major) or layers. A probe
    scored per layer only (no ``head`` dim, e.g. a one-layer knockout) is all NaN at the
    head level, so it pairs with nothing there."""
    n_heads = scores.sizes["layer"] * scores.sizes.get("head", 1)
    out = {}
    for p in scores.data_vars:
        score = scores[p]
        if level == "head":
            flat = (
                score.transpose("layer", "head").values.ravel()
                if "head" in score.dims
                else np.full(n_heads, np.nan)
            )
        else:
            flat = (mean_over(score, "head") if "head" in score.dims else score).transpose("layer").values
        out[str(p)] = flat.astype(float)
    return out


def agreement(scores: xr.Dataset) -> xr.Dataset:
    """Spearman and Kendall correlations between every pair of probes' rankings.

    ``scores``: one (layer, head) or (layer,) variable per probe, higher = more important. Returns
    ``spearman``, ``spearman_p``, ``kendall``, ``kendall_p`` and ``n`` over dims
    (level, probe, other), level = head | layer; the diagonal is 1.
    """
    probes = [str(p) for p in scores.data_vars]
    if len(probes) < 2:
        raise ValueError(f"agreement needs at least two probes, got {probes}")
    out = np.full((5, len(LEVELS), len(probes), len(probes)), np.nan)
    for k, level in enumerate(LEVELS):
        units = _units(scores, level)
        for i, a in enumerate(probes):
            for j, b in enumerate(probes):
                out[:, k, i, j] = _correlations(units[a], units[b])
    dims = ("level", "probe", "other")
    names = ("spearman", "spearman_p", "kendall", "kendall_p", "n")
    data = {name: (dims, out[m]) for m, name in enumerate(names)}
    data["n"] = (dims, np.nan_to_num(out[4]).astype(int))
    return xr.Dataset(
        data,
        coords={"level": list(LEVELS), "probe": probes, "other": probes},
        attrs={"method": "scipy.stats.spearmanr / kendalltau (tau-b), NaN dropped pairwise"},
    )


def agreement_records(result: xr.Dataset, level: str = "head") -> list[dict[str, Any]]:
    """Each unordered pair of probes once, as JSON-ready dicts (NaN -> None)."""

    def num(x: Any) -> float | None:
        x = float(x)
        return None if np.isnan(x) else x

    at = result.sel(level=level)
    probes = [str(p) for p in at.probe.values]
    return [
        {
            "level": level,
            "probe": a,
            "other": b,
            "n": int(at.n.sel(probe=a, other=b)),
            **{
                name: num(at[name].sel(probe=a, other=b))
                for name in ("spearman", "spearman_p", "kendall", "kendall_p")
            },
        }
        for i, a in enumerate(probes)
        for b in probes[i + 1 :]
    ]
