"""Localization heads (Kang et al., CVPR 2025, "Your large vision-language model only needs a
few attention heads for visual grounding"): a second, published way to choose the heads
that look at the object, to set against Head Impact. It never looks at the object's mask.

Our reading of their criterion (the paper was not at hand; the steps as published):

1. **Attention on the image.** Per (sample, layer, head), the sum of the query rows'
   attention over the image tokens (here: the description rows' mean, as the store holds
   it; the paper reads the last query token). Averaged over samples and sorted, the heads
   down to the curve's elbow (`elbow`) are the candidates: a head that barely looks at the
   image cannot localise anything, however focused its little attention is.
2. **Spatial entropy.** Per sample and head, binarise the 2-D map at its mean (token >
   mean over the sample's image tokens, all views pooled), find the connected components
   (`scipy.ndimage.label`, 8-connectivity; components of different views are distinct),
   and take H = -sum_i P(C_i) ln P(C_i) with P(C_i) = |C_i| / sum_j |C_j|. One blob gives
   0, two equal blobs ln 2: low entropy = attention in one place = a localization head.
   NaN when no token is above the mean (a flat map shows no place).
3. **Selection frequency.** In each sample, the ``k`` candidates of lowest entropy (ties:
   more image attention first, then layer and head order) are selected; a head's
   frequency is the share of samples that select it. The heads down to the elbow of the
   sorted frequencies are the localization heads. ``k`` defaults to the paper's 10, but
   at most a quarter of the candidates (rounded up): on a small model 10 would take every
   candidate in every sample and the frequency could not choose.

`localization` gives the per-sample measures (sample, layer, head); `select_heads` the
per-head means, frequencies and the chosen heads (layer, head). ``selection_frequency`` is
the probe's score (`mechhi rank --probe spatial-entropy`, `--compare-probes`, `ablate`).

>>> loc = localization(open_store("stores/toy.zarr"))   # doctest: +SKIP
>>> chosen = select_heads(loc).selected                 # doctest: +SKIP
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr
from scipy import ndimage

from mechhi.store import MAIN_VIEW, attention_name
from probes.maps import done_samples, labels, map_samples, mean_over, own_grids, rank_layers
from probes.registry import Probe, register_probe

PAPER_K = 10
MEASURES = ("visual_mass", "spatial_entropy")
# 8-connectivity in each 2-D map, nothing across the stacked heads (axis 0).
STACKED_8_CONNECTED = np.zeros((3, 3, 3), dtype=bool)
STACKED_8_CONNECTED[1] = True


def elbow(values: np.ndarray) -> int:
    """Index of the elbow of a curve sorted from high to low: the point farthest from the
    straight line through its first and last points, both axes scaled to [0, 1] (the
    "kneedle" construction). Keep items ``[: elbow + 1]``. A flat curve has no elbow:
    every item is kept.

    >>> elbow(np.array([10.0, 2.0, 1.5, 1.0, 0.5, 0.0]))
    1
    """
    y = np.asarray(values, dtype=np.float64)
    if y.ndim != 1 or y.size == 0 or not np.isfinite(y).all():
        raise ValueError("elbow: a non-empty 1-D curve of finite values")
    if np.any(np.diff(y) > 0):
        raise ValueError("elbow: the curve must be sorted from high to low")
    span = y[0] - y[-1]
    if y.size < 3 or span == 0:
        return y.size - 1
    x = np.linspace(0.0, 1.0, y.size)
    scaled = (y - y[-1]) / span  # 1 -> 0
    distance = (1.0 - x) - scaled  # the chord is 1 - x; the perpendicular distance is this over sqrt(2)
    return int(np.argmax(np.abs(distance)))


def component_entropy(sizes: np.ndarray) -> float:
    """-sum P ln P over components of the given sizes, P = size / total; NaN for none.

    >>> round(component_entropy(np.array([3, 3])), 6) == round(math.log(2), 6)
    True
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    sizes = sizes[sizes > 0]
    if sizes.size == 0:
        return math.nan
    p = sizes / sizes.sum()
    return float(-(p * np.log(p)).sum())


def spatial_entropy(maps: dict[str, np.ndarray]) -> np.ndarray:
    """(...) spatial entropy of each map: ``maps[view]`` (..., r, c), the sample's own grid,
    every view binarised at the mean over all views' tokens, then components per view.

    >>> blob = np.zeros((5, 5)); blob[1:3, 1:3] = 1
    >>> float(spatial_entropy({"image": blob}))
    0.0
    """
    views = sorted(maps)
    arrays = [np.asarray(maps[v], dtype=np.float64) for v in views]
    lead = arrays[0].shape[:-2]
    flat = np.concatenate([a.reshape(lead + (-1,)) for a in arrays], axis=-1)
    if np.isnan(flat).any():
        raise ValueError("spatial_entropy: NaN inside the sample's grid")
    mean = flat.mean(-1)[..., None, None] if flat.shape[-1] else np.zeros(lead + (1, 1))
    n_units = int(np.prod(lead, dtype=int))
    heads_of, sizes_of = [], []
    for a in arrays:
        binary = (a > mean).reshape((n_units,) + a.shape[-2:])
        labelled, count = ndimage.label(binary, structure=STACKED_8_CONNECTED)
        if count == 0:
            continue
        unit = np.nonzero(labelled)[0]
        ids = labelled[labelled > 0]
        sizes = np.bincount(ids, minlength=count + 1)[1:]  # (count,)
        owner = np.zeros(count + 1, dtype=int)
        owner[ids] = unit
        heads_of.append(owner[1:])
        sizes_of.append(sizes)
    out = np.full(n_units, np.nan)
    if heads_of:
        owner, sizes = np.concatenate(heads_of), np.concatenate(sizes_of).astype(np.float64)
        total = np.bincount(owner, weights=sizes, minlength=n_units)
        p = sizes / total[owner]
        entropy = np.bincount(owner, weights=-p * np.log(p), minlength=n_units)
        out = np.where(total > 0, entropy, np.nan)
    return out.reshape(lead)


def sample_localization(attention: dict[str, np.ndarray], coverage: dict[str, np.ndarray]) -> np.ndarray:
    """(2, L, H) of one sample: visual_mass (attention summed over the image tokens, all
    views) and spatial_entropy."""
    grids = own_grids(attention, coverage)
    maps = {v: att for v, (att, _) in grids.items()}
    mass = sum(att.astype(np.float64).sum((-2, -1)) for att in maps.values())
    return np.stack([mass, spatial_entropy(maps)])


def localization(ds: xr.Dataset) -> xr.Dataset:
    """visual_mass and spatial_entropy per (sample, layer, head) of a store with attention
    maps; NaN for samples not traced."""
    done = done_samples(ds, "spatial-entropy")
    if attention_name(MAIN_VIEW) not in ds.data_vars:
        raise ValueError("spatial-entropy: the store has no attention maps (traced with --no-maps?)")
    values = map_samples(ds, done, sample_localization, (len(MEASURES), ds.sizes["layer"], ds.sizes["head"]))
    data = {name: (("sample", "layer", "head"), values[:, i]) for i, name in enumerate(MEASURES)}
    return xr.Dataset(data, coords=labels(ds), attrs={"probe": "spatial-entropy"})


def default_k(n_candidates: int) -> int:
    """The paper's 10 heads per sample, at most a quarter of the candidates (rounded up)."""
    return max(1, min(PAPER_K, math.ceil(n_candidates / 4)))


def select_heads(loc: xr.Dataset, k: int | None = None) -> xr.Dataset:
    """Kang et al.'s selection over the samples of `localization` -> (layer, head):
    ``mean_visual_mass``, ``mean_spatial_entropy``, ``candidate`` (above the mass elbow),
    ``selection_frequency`` (share of samples whose k lowest-entropy candidates hold the
    head; 0 for non-candidates), ``selected`` (above the frequency elbow); attrs say the
    thresholds and k."""
    mass = mean_over(loc["visual_mass"], "sample").transpose("layer", "head")
    entropy = mean_over(loc["spatial_entropy"], "sample").transpose("layer", "head")
    flat_mass = mass.values.ravel()
    scored = np.flatnonzero(np.isfinite(flat_mass))
    if scored.size == 0:
        raise ValueError("spatial-entropy: no traced sample to select heads from")
    by_mass = scored[np.argsort(-flat_mass[scored], kind="stable")]
    mass_threshold = float(flat_mass[by_mass[elbow(flat_mass[by_mass])]])
    candidate = np.isfinite(flat_mass) & (flat_mass >= mass_threshold)
    k = default_k(int(candidate.sum())) if k is None else k
    if k < 1:
        raise ValueError(f"--per-sample-k {k}: must be at least 1")
    per_sample_entropy = loc["spatial_entropy"].transpose("sample", "layer", "head").values
    per_sample_mass = loc["visual_mass"].transpose("sample", "layer", "head").values
    n_samples = per_sample_entropy.shape[0]
    counts = np.zeros(flat_mass.size)
    traced = 0
    for s in range(n_samples):
        e, m = per_sample_entropy[s].ravel(), per_sample_mass[s].ravel()
        if not np.isfinite(m).any():
            continue  # not traced
        traced += 1
        pool = np.flatnonzero(candidate & np.isfinite(e))
        order = pool[np.lexsort((-m[pool], e[pool]))]  # lowest entropy, then most image attention; stable
        counts[order[:k]] += 1
    frequency = counts / max(traced, 1)
    by_frequency = np.argsort(-frequency, kind="stable")
    frequency_threshold = float(frequency[by_frequency[elbow(frequency[by_frequency])]])
    selected = (frequency >= frequency_threshold) & (frequency > 0)
    shape = mass.shape
    dims = ("layer", "head")
    coords = dict(mass.coords.items())
    return xr.Dataset(
        {
            "mean_visual_mass": mass,
            "mean_spatial_entropy": entropy,
            "candidate": (dims, candidate.reshape(shape)),
            "selection_frequency": (dims, frequency.reshape(shape)),
            "selected": (dims, selected.reshape(shape)),
        },
        coords=coords,
        attrs={
            "probe": "spatial-entropy",
            "per_sample_k": int(k),
            "mass_threshold": mass_threshold,
            "frequency_threshold": frequency_threshold,
            "n_candidates": int(candidate.sum()),
            "n_selected": int(selected.sum()),
            "samples": int(traced),
        },
    )


def chosen_heads(selection: xr.Dataset, n: int | None = None) -> list[tuple[int, int]]:
    """The selected (layer, head) pairs, most frequently selected first (ties: lower mean
    entropy, then layer and head order); with ``n``, the ``n`` first in that order of all
    heads ever selected, whether above the elbow or not (to match another probe's set size)."""
    flat = selection.stack(unit=("layer", "head"))
    frequency = flat["selection_frequency"].values
    keep = np.flatnonzero(flat["selected"].values if n is None else frequency > 0)
    if n is not None and not 1 <= n <= keep.size:
        raise ValueError(
            f"--n-heads {n}: spatial entropy selects {keep.size} heads in some sample (need 1..{keep.size})"
        )
    entropy = np.nan_to_num(flat["mean_spatial_entropy"].values[keep], nan=np.inf)
    order = keep[np.lexsort((entropy, -frequency[keep]))][:n]
    return [(int(flat["layer"].values[i]), int(flat["head"].values[i])) for i in order]


def layer_ranking(selection: xr.Dataset) -> xr.DataArray:
    """Layers by mean selection frequency over their heads, best first, with ``rank`` and
    ``depth`` coords like the other probes' rankings."""
    return rank_layers(mean_over(selection["selection_frequency"], "head"), "mean_selection_frequency")


PROBE = register_probe(
    Probe(
        "spatial-entropy",
        ("store",),
        "how often the head is among a sample's most focused image-attending heads (Kang et al.)",
        lambda inputs: select_heads(localization(inputs.ds))["selection_frequency"],
    )
)
