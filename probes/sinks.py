"""Visual attention sinks: a few image tokens that take a large share of a head's attention.

Kang et al. (ICLR 2025, "See what you are told: visual attention sink in large multimodal
models") find image tokens that draw a large share of attention whatever the image shows
or the question asks; in the language model they carry massive activations in a few
fixed hidden dimensions. A store holds attention only, no hidden states, so this probe
measures the attention side of a sink, per (sample, layer, head), on the description
rows' attention over the sample's valid image tokens (all views pooled):

- a token is a **sink** of a head when its attention exceeds ``tau`` times the head's mean
  attention over the image tokens (``tau`` = 20 by default, the threshold Kang et al.
  put on the activation ratio). Why a multiple of the mean: it is the share a head that
  spread its attention evenly would give the token, so the rule means "20 times its fair
  share" on any grid size. Sinks are few by construction: if m tokens each take more than
  tau times the mean, m * tau * mean < n * mean, so fewer than n / tau tokens qualify
  (on a 24 x 24 grid fewer than 29; on an 8 x 8 toy grid at most 3, each over 31% of the
  head's image attention).
- ``sink_share``: the sinks' share of the head's image attention (0 when none).
- ``n_sinks``: how many tokens are sinks.
- ``top_share``: the share of the head's ``top_k`` most-attended tokens (threshold-free;
  a head spreading evenly gets ``top_k / n_tokens``, kept as ``uniform_top_share``).
- ``sink_coverage``: the mean object coverage of the sink tokens (NaN without sinks). A
  sink in Kang et al.'s sense is not about content; a "sink" that sits on the object is a
  head focused on a small object, which attention alone cannot tell apart. This says
  which it is.

NaN for heads with no attention on the image and for samples not traced. `excluded`
gives the token mask Head Impact's ``mean-without-sinks`` rule drops before binarising.

>>> result = sinks(open_store("stores/toy.zarr"))   # doctest: +SKIP
>>> summary(result)["share_with_sinks"]            # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from mechhi.store import MAIN_VIEW, attention_name
from probes.maps import done_samples, labels, map_samples, mean_over, pool_views

SINK_TAU = 20.0
TOP_K = 2
MEASURES = ("sink_share", "n_sinks", "top_share", "sink_coverage")


def sink_tokens(attention: np.ndarray, valid: np.ndarray, tau: float = SINK_TAU) -> np.ndarray:
    """(..., V) attention, (V,) valid -> (..., V) bool: attention > tau x the mean over valid tokens.

    >>> sink_tokens(np.array([0.0, 0.0, 0.0, 4.0] + [0.0] * 96), np.ones(100, bool)).nonzero()[0]
    array([3])
    """
    if not tau > 1:
        raise ValueError(f"sink tau {tau!r}: must be above 1 (a sink takes more than the mean)")
    a = np.where(valid, np.asarray(attention, dtype=np.float64), 0.0)
    mean = a.sum(-1, keepdims=True) / max(int(np.sum(valid)), 1)
    return np.asarray(valid, bool) & (a > tau * mean) & (mean > 0)


def sample_sinks(
    attention: dict[str, np.ndarray],
    coverage: dict[str, np.ndarray],
    tau: float = SINK_TAU,
    top_k: int = TOP_K,
) -> np.ndarray:
    """(5, L, H) of one sample: sink_share, n_sinks, top_share, sink_coverage, and the
    number of valid tokens (the same for every head), all views pooled."""
    att, cov = pool_views(attention, coverage)  # (L, H, V), (V,)
    valid = np.isfinite(cov)
    a = att[..., valid].astype(np.float64)  # (L, H, n)
    if np.isnan(a).any():
        raise ValueError("NaN attention on a valid visual token")
    m = cov[valid].astype(np.float64)
    n = a.shape[-1]
    sink = sink_tokens(a, np.ones(n, bool), tau)  # (L, H, n)
    total = a.sum(-1)
    count = sink.sum(-1)
    k = min(top_k, n)
    top = -np.sort(-a, axis=-1)[..., :k].sum(-1) if k else np.zeros_like(total)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, (a * sink).sum(-1) / total, np.nan)
        top_share = np.where(total > 0, top / total, np.nan)
        on_object = np.where(count > 0, (sink * m).sum(-1) / count, np.nan)
    return np.stack([share, count.astype(float), top_share, on_object, np.full_like(total, n)])


def sinks(ds: xr.Dataset, tau: float = SINK_TAU, top_k: int = TOP_K) -> xr.Dataset:
    """The sink measures of every (sample, layer, head) of a store with attention maps
    (NaN for samples not traced), with ``n_tokens`` and ``uniform_top_share`` (sample)."""
    if top_k < 1:
        raise ValueError(f"sink top-k {top_k}: must be at least 1")
    sink_tokens(np.zeros(1), np.ones(1, bool), tau)  # checks tau before the pass
    done = done_samples(ds, "sinks")
    if attention_name(MAIN_VIEW) not in ds.data_vars:
        raise ValueError("sinks: the store has no attention maps (traced with --no-maps?)")
    shape = (len(MEASURES) + 1, ds.sizes["layer"], ds.sizes["head"])
    values = map_samples(ds, done, lambda att, cov: sample_sinks(att, cov, tau, top_k), shape)  # (S, 5, L, H)
    dims = ("sample", "layer", "head")
    data = {name: (dims, values[:, i]) for i, name in enumerate(MEASURES)}
    n_tokens = values[:, len(MEASURES), 0, 0]
    data["n_tokens"] = ("sample", n_tokens)
    data["uniform_top_share"] = ("sample", np.minimum(top_k, n_tokens) / n_tokens)
    return xr.Dataset(
        data, coords=labels(ds), attrs={"probe": "sinks", "tau": float(tau), "top_k": int(top_k)}
    )


def excluded(attention: np.ndarray, valid: np.ndarray, tau: float = SINK_TAU) -> np.ndarray:
    """(..., V) valid tokens with each head's sinks removed: Head Impact's
    ``mean-without-sinks`` rule binarises over these (sinks neither raise the mean nor
    count as attended)."""
    return np.asarray(valid, bool) & ~sink_tokens(attention, valid, tau)


def summary(result: xr.Dataset, top: int = 5) -> dict[str, Any]:
    """JSON-ready overview of `sinks`: overall and per-layer shares, the heads with the
    largest mean sink share. Means skip NaN (untraced samples, heads blind to the image)."""

    def num(x: Any) -> float | None:
        x = float(x)
        return None if np.isnan(x) else x

    has = (result["n_sinks"] > 0).where(result["n_sinks"].notnull())
    per_head = mean_over(result["sink_share"], "sample")
    per_head_has = mean_over(has, "sample")
    flat = per_head.stack(unit=("layer", "head"))
    order = np.argsort(-np.nan_to_num(flat.values, nan=-1.0), kind="stable")[:top]
    layers = [
        {
            "layer": int(layer),
            "mean_sink_share": num(mean_over(per_head.sel(layer=layer), "head")),
            "share_with_sinks": num(mean_over(per_head_has.sel(layer=layer), "head")),
            "mean_top_share": num(
                mean_over(mean_over(result["top_share"].sel(layer=layer), "sample"), "head")
            ),
        }
        for layer in result["layer"].values
    ]
    heads = [
        {
            "layer": int(flat["layer"].values[i]),
            "head": int(flat["head"].values[i]),
            "mean_sink_share": num(flat.values[i]),
            "share_with_sinks": num(
                per_head_has.sel(layer=flat["layer"].values[i], head=flat["head"].values[i])
            ),
            "sink_coverage": num(
                mean_over(
                    result["sink_coverage"].sel(layer=flat["layer"].values[i], head=flat["head"].values[i]),
                    "sample",
                )
            ),
        }
        for i in order
    ]
    coverage = result["sink_coverage"].values
    return {
        "tau": result.attrs["tau"],
        "top_k": result.attrs["top_k"],
        "samples": int(np.isfinite(result["n_tokens"].values).sum()),
        "share_with_sinks": num(mean_over(has, ("sample", "layer", "head"))),
        "mean_sink_share": num(mean_over(result["sink_share"], ("sample", "layer", "head"))),
        "mean_top_share": num(mean_over(result["top_share"], ("sample", "layer", "head"))),
        "uniform_top_share": num(mean_over(result["uniform_top_share"], "sample")),
        "sink_coverage": num(np.nanmean(coverage)) if np.isfinite(coverage).any() else None,
        "layers": layers,
        "heads": heads,
    }
