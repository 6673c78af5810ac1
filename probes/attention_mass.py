"""Attention-mass baselines: soft, threshold-free companions to Head Impact.

Head Impact binarises both the attention map and the mask, so it cannot tell a head
that puts 90% of its image attention on the object from one that puts 40% there,
and it says nothing about whether the head looks at the image at all. These probes
read the same store and keep the probabilities:

- ``visual_mass``: the description rows' attention on the visual tokens, summed (the
  rest goes to text and special tokens). A head near 0 ignores the image.
- ``object_share``: of that visual attention, the share on the object, each token
  weighted by the fraction of its pixels inside the object.
- ``object_lift``: ``object_share`` over the object's share of the image's tokens,
  the share a head that spreads its attention evenly would get. 1 = no preference for
  the object; a head that looks only at a quarter-image object gets 4.

Per sample, per (layer, head); ``head_means`` averages them over samples,
``layer_means`` also over heads, and ``layer_ranking`` ranks layers by mean lift, as Head
Impact's ranking does.

>>> mass = attention_mass(open_store("stores/toy.zarr"))  # doctest: +SKIP
>>> head_means(mass).object_lift.mean("head").sortby(...)  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from mechhi.store import MAIN_VIEW, attention_name
from probes.maps import done_samples, for_each_sample, labels, mean_over, pool_views, rank_layers
from probes.registry import Probe, register_probe

MEASURES = ("visual_mass", "object_share", "object_lift")


def sample_mass(attention: dict[str, np.ndarray], coverage: dict[str, np.ndarray]) -> np.ndarray:
    """(3, L, H): visual_mass, object_share, object_lift of one sample, all views pooled.

    object_share is NaN for a head with no attention on the image, object_lift also
    for an object that covers no token.
    """
    att, cov = pool_views(attention, coverage)  # (L, H, V), (V,)
    valid = np.isfinite(cov)
    a = att[..., valid].astype(np.float64)  # (L, H, n)
    if np.isnan(a).any():
        raise ValueError("NaN attention on a valid visual token")
    m = cov[valid].astype(np.float64)  # (n,)
    visual = a.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(visual > 0, (a * m).sum(-1) / visual, np.nan)
        area = m.sum() / max(m.size, 1)
        lift = share / area if area > 0 else np.full_like(share, np.nan)
    return np.stack([visual, share, lift])


def attention_mass(ds: xr.Dataset) -> xr.Dataset:
    """visual_mass, object_share and object_lift per (sample, layer, head) of a store
    with attention maps; NaN for samples not yet traced."""
    done = done_samples(ds, "attention_mass")
    if attention_name(MAIN_VIEW) not in ds.data_vars:
        raise ValueError("attention_mass: the store has no attention maps (traced with --no-maps?)")
    values = for_each_sample(ds, done, sample_mass, outputs=len(MEASURES))  # (S, 3, L, H)
    coords = labels(ds)
    return xr.Dataset(
        {name: (("sample", "layer", "head"), values[:, k]) for k, name in enumerate(MEASURES)},
        coords=coords,
        attrs={"probe": "attention-mass"},
    )


def head_means(mass: xr.Dataset) -> xr.Dataset:
    """Mean over samples (NaN skipped) of each measure -> (layer, head)."""
    return mean_over(mass[list(MEASURES)], "sample")


def layer_means(mass: xr.Dataset) -> xr.Dataset:
    """Each measure's head means averaged over heads -> (layer,)."""
    return mean_over(head_means(mass), "head")


def layer_ranking(mass: xr.Dataset, measure: str = "object_lift") -> xr.DataArray:
    """Layers by a measure's ``layer_means``, best first (NaN last), with ``rank`` and
    ``depth`` coords like ``probes.head_impact.layer_ranking``."""
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; choose from {', '.join(MEASURES)}")
    return rank_layers(layer_means(mass)[measure], f"mean_{measure}")


PROBE = register_probe(
    Probe(
        "attention-mass",
        ("store",),
        "the object's share of the head's image attention over its area share",
        lambda inputs: head_means(attention_mass(inputs.ds))["object_lift"],
    )
)
