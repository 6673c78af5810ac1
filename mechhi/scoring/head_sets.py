"""Which heads to change: a probe's top or bottom N, and the random sets to compare them with.

A causal test of a ranking compares its top heads with heads that differ only in *not*
being chosen by the probe. Two controls, both seeded:

- ``matched``: the same number of heads in every layer as the chosen set, drawn
  uniformly within each layer (Head Pursuit's control). It asks whether the probe picks
  the right heads *within* the layers it picks; a layer the set fills entirely is the
  same in every draw.
- ``depth``: the same number of heads per depth bin (``bins`` contiguous groups of
  layers, thirds by default), drawn uniformly over the bin's heads. It keeps the set's
  depth profile but lets the layers move, so it also asks whether the probe picks the
  right layers.

Draws are uniform over all heads of a layer (or bin), the chosen ones included: the
control is "heads like these, picked blind", not "heads other than these". How much a
draw shares with the probe's set is reported beside it (``overlap``).

>>> chosen = top_heads(store.head_impact, 8)                    # doctest: +SKIP
>>> random_matched(chosen, n_heads=4, seed=0)                     # doctest: +SKIP
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import xarray as xr

from mechhi.store.schema import Head

CONTROLS = ("matched", "depth")


def _ordered(scores: xr.DataArray, descending: bool) -> list[Head]:
    """Heads with a finite score, best (or worst) first; ties keep (layer, head) order."""
    flat = scores.transpose("layer", "head").stack(unit=("layer", "head"))
    values = flat.values.astype(np.float64)
    finite = np.flatnonzero(np.isfinite(values))
    order = finite[np.argsort(-values[finite] if descending else values[finite], kind="stable")]
    return [(int(flat["layer"].values[i]), int(flat["head"].values[i])) for i in order]


def top_heads(scores: xr.DataArray, n: int) -> tuple[Head, ...]:
    """The ``n`` heads of highest score (layer, head); NaN scores are never chosen."""
    return _take(_ordered(scores, descending=True), n)


def bottom_heads(scores: xr.DataArray, n: int) -> tuple[Head, ...]:
    """The ``n`` heads of lowest score; NaN scores are never chosen."""
    return _take(_ordered(scores, descending=False), n)


def _take(ordered: list[Head], n: int) -> tuple[Head, ...]:
    if not 1 <= n <= len(ordered):
        raise ValueError(f"head set of {n}: the probe scores {len(ordered)} heads (need 1..{len(ordered)})")
    return tuple(sorted(ordered[:n]))


def per_layer(heads: Iterable[Head]) -> dict[int, int]:
    """How many heads of the set sit in each layer."""
    return dict(sorted(Counter(layer for layer, _ in heads).items()))


def depth_bins(n_layers: int, bins: int = 3) -> list[list[int]]:
    """``bins`` contiguous groups of layers of near-equal size (numpy.array_split)."""
    if not 1 <= bins <= n_layers:
        raise ValueError(f"depth bins: {bins} bins for {n_layers} layers")
    return [[int(l) for l in group] for group in np.array_split(np.arange(n_layers), bins)]


def random_matched(heads: Iterable[Head], *, n_heads: int, seed: int) -> tuple[Head, ...]:
    """A random set with the same number of heads in every layer as ``heads``."""
    rng = np.random.default_rng([seed, 1])
    drawn: list[Head] = []
    for layer, count in per_layer(heads).items():
        drawn += [(layer, int(h)) for h in rng.choice(n_heads, size=count, replace=False)]
    return tuple(sorted(drawn))


def random_depth(
    heads: Iterable[Head], *, n_layers: int, n_heads: int, seed: int, bins: int = 3
) -> tuple[Head, ...]:
    """A random set with the same number of heads per depth bin as ``heads``."""
    rng = np.random.default_rng([seed, 2])
    counts = per_layer(heads)
    drawn: list[Head] = []
    for group in depth_bins(n_layers, bins):
        pool = [(layer, h) for layer in group for h in range(n_heads)]
        count = sum(counts.get(layer, 0) for layer in group)
        drawn += [pool[int(i)] for i in rng.choice(len(pool), size=count, replace=False)]
    return tuple(sorted(drawn))


def random_control(
    kind: str, heads: Iterable[Head], *, n_layers: int, n_heads: int, seed: int, bins: int = 3
) -> tuple[Head, ...]:
    """The ``kind`` control (``matched`` or ``depth``) of ``heads``, seeded."""
    if kind == "matched":
        return random_matched(heads, n_heads=n_heads, seed=seed)
    if kind == "depth":
        return random_depth(heads, n_layers=n_layers, n_heads=n_heads, seed=seed, bins=bins)
    raise ValueError(f"unknown random control {kind!r}; choose from {', '.join(CONTROLS)}")


def overlap(a: Iterable[Head], b: Iterable[Head]) -> float:
    """Share of ``a``'s heads that are also in ``b``."""
    a, b = set(a), set(b)
    return len(a & b) / len(a) if a else float("nan")
