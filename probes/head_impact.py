"""Head Impact (Sergeev & Kotelnikov 2025, section 4): how well each attention head's
attention on the visual tokens overlaps the described object.

For one sample and one (layer, head): binarise the attention scores of the visual
tokens (score > their mean), binarise the object's token coverage (>= 0.5, a small
object keeps its best-covered token), and take IoU = |A and M| / |A or M| (NaN when
the union is empty). HI(layer, head) is the mean IoU over samples, skipping NaN.
With several views of one image (tile mosaic + global image) the tokens of all views
are pooled: one attention mean over all of them, intersection and union summed.

Kernels work on plain numpy arrays with visual tokens on the last axis (``V``), every
view flattened and concatenated; ``score`` labels them once, reading the store one
block of samples at a time (``probes.maps``) so a large attention cube is never loaded whole.

>>> ds = score(open_store("stores/toy.zarr"))  # doctest: +SKIP
>>> layer_ranking(ds).isel(layer=slice(0, 4))  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from scipy import stats

from mechhi.store import (
    MAIN_VIEW,
    StoreLocked,
    WriterLock,
    attention_name,
    json_attrs,
    open_store,
    write_scores,
)
from probes import sinks
from probes.maps import done_samples, for_each_sample, labels, mean_over, pool_views, rank_layers
from probes.registry import Probe, ProbeInputs, register_probe
from probes.sinks import SINK_TAU
from probes.statistics import holm

ATTENTION_RULES = ("mean", "mean-without-sinks")


@dataclass(frozen=True)
class BinarizeRule:
    """How attention scores and object coverage become token sets; recorded in the
    store attrs ('binarize') so a HI number always says how it was made."""

    attention: str = (
        "mean"  # token in A iff score > mean score over the sample's valid visual tokens (all views)
    )
    mask_threshold: float = 0.5  # token in M iff coverage >= threshold
    keep_best_token: bool = (
        True  # if no token reaches the threshold, M = the best-covered token(s) (ties: all)
    )
    # "mean-without-sinks": each head's sink tokens (attention > sink_tau x its mean, probes.sinks) are left
    # out of its mean and of A; recorded only with that rule, so the default rule's record is unchanged.
    sink_tau: float = SINK_TAU

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_RULES:
            raise ValueError(
                f"BinarizeRule.attention={self.attention!r}: choose from {', '.join(ATTENTION_RULES)}"
            )
        if not float(self.sink_tau) > 1.0:
            raise ValueError(f"BinarizeRule.sink_tau={self.sink_tau!r} must be above 1")
        if not 0.0 < float(self.mask_threshold) <= 1.0:
            raise ValueError(f"BinarizeRule.mask_threshold={self.mask_threshold!r} must be in (0, 1]")
        if not isinstance(self.keep_best_token, bool):
            raise ValueError(f"BinarizeRule.keep_best_token={self.keep_best_token!r} must be a bool")

    @property
    def excludes_sinks(self) -> bool:
        return self.attention == "mean-without-sinks"

    def describe(self) -> str:
        best = "; an object below it keeps its best-covered token(s)" if self.keep_best_token else ""
        sinks = (
            f", each head's sinks (> {self.sink_tau:g} x its mean) left out" if self.excludes_sinks else ""
        )
        return (
            f"attention: score > mean over the sample's visual tokens (all views){sinks}; "
            f"mask: coverage >= {self.mask_threshold}{best}"
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.excludes_sinks:
            del data["sink_tau"]  # the plain rule reads as it always has
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BinarizeRule:
        return cls(**data)


# ---------------------------------------------------------------- kernels (numpy)
def binarize_attention(scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(..., V) scores, (V,) or (..., V) valid -> (..., V) bool: score > mean over valid tokens.

    >>> binarize_attention(np.array([1.0, 3.0, 9.0]), np.array([True, True, False]))
    array([False,  True, False])
    """
    scores = np.asarray(scores, dtype=np.float64)
    valid = np.broadcast_to(np.asarray(valid, dtype=bool), scores.shape)
    if np.isnan(scores[valid]).any():
        raise ValueError("binarize_attention: NaN attention score on a valid visual token")
    n = valid.sum(-1, keepdims=True)  # (..., 1)
    mean = np.where(valid, scores, 0.0).sum(-1, keepdims=True) / np.maximum(n, 1)  # (..., 1)
    return valid & (np.where(valid, scores, -np.inf) > mean)


def binarize_mask(coverage: np.ndarray, rule: BinarizeRule = BinarizeRule()) -> np.ndarray:
    """(..., V) coverage in 0..1, NaN outside the grid -> (..., V) bool.

    With ``keep_best_token``, an object reaching the threshold nowhere claims the
    token(s) of its highest coverage, if that is above 0 (an object absent from the
    grid claims nothing).

    >>> binarize_mask(np.array([0.1, 0.3, np.nan, 0.3]))
    array([False,  True, False,  True])
    """
    cov = np.asarray(coverage, dtype=np.float64)
    cov = np.where(np.isfinite(cov), cov, -np.inf)
    out = cov >= rule.mask_threshold
    if rule.keep_best_token and cov.shape[-1] > 0:
        best = cov.max(-1, keepdims=True)  # (..., 1)
        out |= ~out.any(-1, keepdims=True) & (best > 0) & (cov == best)
    return out


def iou(attention_bin: np.ndarray, mask_bin: np.ndarray) -> np.ndarray | float:
    """IoU over the last axis of two broadcastable bool arrays; NaN where the union is empty.

    >>> iou(np.array([True, True, False]), np.array([True, False, False]))
    0.5
    """
    inter = np.logical_and(attention_bin, mask_bin).sum(-1)
    union = np.logical_or(attention_bin, mask_bin).sum(-1)
    out = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return float(out) if out.ndim == 0 else out


def sample_iou(
    attention: dict[str, np.ndarray], coverage: dict[str, np.ndarray], rule: BinarizeRule = BinarizeRule()
) -> np.ndarray:
    """IoU of every head for one sample -> (L, H).

    attention[view]: (L, H, rows, cols), coverage[view]: (rows, cols), both NaN outside
    the sample's grid (the coverage NaN pattern defines the valid tokens). All views are
    pooled: one attention mean over all valid tokens, intersection and union summed.
    """
    att, cov = pool_views(attention, coverage)  # (L, H, V), (V,)
    valid = np.isfinite(cov)  # (V,)
    if rule.excludes_sinks:
        valid = sinks.excluded(att, valid, rule.sink_tau)  # (L, H, V): each head without its own sinks
    return iou(binarize_attention(att, valid), binarize_mask(cov, rule))  # (L, H)


# ---------------------------------------------------------------- labelled edge
def _iou_from_maps(ds: xr.Dataset, done: np.ndarray, rule: BinarizeRule) -> np.ndarray:
    """(sample, layer, head) IoU of the done samples (NaN elsewhere)."""
    return for_each_sample(ds, done, lambda attention, coverage: sample_iou(attention, coverage, rule))[:, 0]


def _traced_iou(ds: xr.Dataset, done: np.ndarray, rule: BinarizeRule) -> tuple[np.ndarray, Any]:
    """IoU written by a --no-maps trace; it cannot be re-binarised, so the rule must match."""
    recorded = ds.attrs.get("binarize")
    if recorded is not None and json_attrs({"r": recorded}) != json_attrs({"r": rule.to_dict()}):
        raise ValueError(
            f"store has no attention maps and its iou was binarised with {recorded}; "
            f"cannot rescore with {rule.to_dict()}"
        )
    iou_values = ds["iou"].transpose("sample", "layer", "head").values.astype(np.float64)
    return np.where(done[:, None, None], iou_values, np.nan), recorded


def score(ds: xr.Dataset, rule: BinarizeRule = BinarizeRule()) -> xr.Dataset:
    """Per-sample ``iou`` (sample, layer, head) and ``head_impact`` (layer, head) of a store.

    Only samples flagged ``done`` count (others get NaN); attrs ``scored_samples`` says
    how many, so scores of a half-traced store are recognisably stale later
    (`scores_current`). A store traced with --no-maps has no attention maps: its traced
    ``iou`` is used and only HI is recomputed.
    """
    done = done_samples(ds, "score")
    if attention_name(MAIN_VIEW) in ds.data_vars:
        values, binarize = _iou_from_maps(ds, done, rule), rule.to_dict()
    elif "iou" in ds.data_vars:
        values, binarize = _traced_iou(ds, done, rule)
    else:
        raise ValueError("score: dataset has neither attention maps nor iou")
    iou_da = xr.DataArray(values, dims=("sample", "layer", "head"), coords=labels(ds), name="iou")
    attrs = {"binarize": binarize, "scored_samples": int(done.sum())}
    return xr.Dataset({"iou": iou_da, "head_impact": head_impact_from_iou(iou_da)}, attrs=attrs)


def head_impact_from_iou(iou: xr.DataArray) -> xr.DataArray:
    """HI(layer, head) = mean IoU over samples, NaN samples skipped (NaN if all are)."""
    return mean_over(iou, "sample").rename("head_impact")


def _head_impact(ds: xr.Dataset) -> xr.DataArray:
    if "head_impact" in ds.data_vars:
        return ds["head_impact"]
    if "iou" in ds.data_vars:
        return head_impact_from_iou(ds["iou"])
    raise ValueError("dataset has neither head_impact nor iou: score it first")


def layer_ranking(ds: xr.Dataset) -> xr.DataArray:
    """Mean HI over heads per layer, best layer first (NaN layers last, ties by layer).

    Keeps the ``layer`` dim (so ``.sel(layer=3)`` works) with ``rank`` (1 = best) and
    ``depth`` coords.
    """
    return rank_layers(mean_over(_head_impact(ds), "head"), "mean_head_impact")


# ---------------------------------------------------------------- statistics
def _kruskal(groups: list[np.ndarray]) -> tuple[float, int, float, int]:
    """(statistic, df, p_value, n_values) over the non-empty groups (NaN already dropped)."""
    groups = [g for g in groups if g.size]
    df, n = len(groups) - 1, int(sum(g.size for g in groups))
    if len(groups) < 2:
        return np.nan, df, np.nan, n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # all-identical values: scipy returns NaN and warns
        res = stats.kruskal(*groups)
    return float(res.statistic), df, float(res.pvalue), n


def kruskal_wallis(ds: xr.Dataset) -> xr.Dataset:
    """Kruskal-Wallis H tests of "HI differs across layers / across heads".

    Four tests along dim ``test``: across layers and across heads, on per-head HI
    (a layer's group = its heads' HI; a head's group = that head's HI over layers) and
    on per-sample IoU (a layer's group pools samples x heads; a head's, samples x
    layers); NaN dropped. Each has ``statistic``, ``df`` (groups - 1), ``p_value``
    (scipy.stats.kruskal) and ``p_holm`` (Holm over the four); see :func:`kruskal_records`
    for JSON. In float64: a store's iou is float32, for which scipy returns a float32 p that
    underflows to 0 (the toy store's 1.4e-89 across layers would read 0).
    """
    if "iou" not in ds.data_vars:
        raise ValueError("kruskal_wallis: dataset has no iou: score it first")
    hi = _head_impact(ds).transpose("layer", "head").values.astype(np.float64)  # (L, H)
    per_sample = ds["iou"].transpose("sample", "layer", "head").values.astype(np.float64)  # (S, L, H)
    L, H = hi.shape

    def clean(x: np.ndarray) -> np.ndarray:
        return x[np.isfinite(x)].ravel()

    tests = {
        ("layer", "head_impact"): [clean(hi[l]) for l in range(L)],
        ("head", "head_impact"): [clean(hi[:, h]) for h in range(H)],
        ("layer", "iou"): [clean(per_sample[:, l, :]) for l in range(L)],
        ("head", "iou"): [clean(per_sample[:, :, h]) for h in range(H)],
    }
    rows = [_kruskal(groups) for groups in tests.values()]
    statistic, df, p_value, n_values = (np.array(col) for col in zip(*rows))
    return xr.Dataset(
        {
            "statistic": ("test", statistic.astype(float)),
            "df": ("test", df.astype(int)),
            "p_value": ("test", p_value.astype(float)),
            "p_holm": ("test", holm(p_value)),
            "n_values": ("test", n_values.astype(int)),
        },
        coords={
            "test": [f"{on} across {across}s" for across, on in tests],
            "across": ("test", [across for across, _ in tests]),
            "on": ("test", [on for _, on in tests]),
        },
    )


def kruskal_records(result: xr.Dataset) -> list[dict[str, Any]]:
    """The kruskal_wallis result as a list of plain dicts (stable keys, JSON-ready;
    NaN and infinities become None)."""

    def num(x: Any) -> float | None:
        x = float(x)
        return x if np.isfinite(x) else None

    return [
        {
            "test": str(result["test"].values[i]),
            "across": str(result["across"].values[i]),
            "on": str(result["on"].values[i]),
            "statistic": num(result["statistic"].values[i]),
            "df": int(result["df"].values[i]),
            "p_value": num(result["p_value"].values[i]),
            "p_holm": num(result["p_holm"].values[i]),
            "n_values": int(result["n_values"].values[i]),
        }
        for i in range(result.sizes["test"])
    ]


def score_store(path: str | Path, rule: BinarizeRule = BinarizeRule()) -> xr.Dataset:
    """Open a store, score it, write ``iou``/``head_impact``/``binarize``/``scored_samples``
    back, return the scores. Scores of a half-traced store are written as such (their
    ``scored_samples`` is below the sample count); `ensure_scored` never writes them."""
    ds = open_store(path)
    scores = score(ds, rule)
    write_scores(path, scores, opened=ds)
    return scores


# ---------------------------------------------------------------- scores kept in a store
def store_rule(ds: xr.Dataset) -> BinarizeRule:
    """The rule the store's own scores follow: the one recorded in it (default if none)."""
    recorded = ds.attrs.get("binarize")
    return BinarizeRule.from_dict(recorded) if recorded else BinarizeRule()


def scores_current(ds: xr.Dataset, rule: BinarizeRule | None = None) -> bool:
    """Whether the store's ``head_impact`` covers every sample now done (under ``rule``,
    default: the store's own rule). False for scores of a store that was half traced
    when they were computed, or written by a mechhi that did not record ``scored_samples``."""
    if "head_impact" not in ds.data_vars or ds.attrs.get("scored_samples") != int(ds["done"].sum()):
        return False
    return rule is None or json_attrs({"r": ds.attrs.get("binarize")}) == json_attrs({"r": rule.to_dict()})


@dataclass(frozen=True)
class Scored:
    """A store with ``iou`` and ``head_impact`` under the asked rule, and what was done
    to get them (``note``: one line for stderr; None when the stored scores were used)."""

    ds: xr.Dataset
    note: str | None


def ensure_scored(path: str | Path, rule: BinarizeRule | None = None) -> Scored:
    """The store's scores under ``rule`` (default: the store's own), computing what is missing.

    The store keeps scores of its own rule only, and only of a complete trace: a complete
    store whose scores are missing or stale is scored and saved (under its writer lock;
    if another process holds it, in memory). A half-traced store is scored in memory and
    never written, so its scores cannot outlive the trace. Another rule than the store's
    is scored in memory: the store keeps the scores other commands rely on.
    """
    path = Path(path)
    ds = open_store(path)
    own = store_rule(ds)
    rule = rule or own
    done, total = int(ds["done"].sum()), ds.sizes["sample"]
    note = None
    if done == total and not scores_current(ds, own):
        try:
            with WriterLock(path):
                score_store(path, own)
            ds, note = open_store(path), f"scoring the store ({own.describe()}) and saving the scores in it"
        except StoreLocked:
            note = "scoring in memory: another process is writing the store"
        except OSError as error:  # e.g. a store on a read-only file system
            note = f"scoring in memory: the scores cannot be saved in the store ({error})"
    if scores_current(ds, rule):
        return Scored(ds, note)
    scores = score(ds, rule)
    if done < total:
        note = (
            f"scoring in memory ({rule.describe()}): only {done} of {total} samples are traced, "
            "so nothing is saved"
        )
    elif note is None:
        note = f"scoring in memory ({rule.describe()}); the store keeps its own scores"
    merged = ds.drop_vars([name for name in scores.data_vars if name in ds]).assign(scores.data_vars)
    merged.attrs = {**ds.attrs, **scores.attrs}
    return Scored(merged, note)


def _probe_score(inputs: ProbeInputs) -> xr.DataArray:
    """The store's HI where it is scored, else scored now with the default rule."""
    ds = inputs.ds
    if "head_impact" in ds.data_vars and not bool(ds.head_impact.isnull().all()):
        return ds["head_impact"].compute()
    return score(ds)["head_impact"]


PROBE = register_probe(
    Probe(
        "head-impact",
        ("store",),
        "mean IoU of the above-mean attention with the object mask (Sergeev & Kotelnikov)",
        _probe_score,
    )
)
