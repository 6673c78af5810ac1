"""The depth-matched control: for each top-K layer, a layer of near depth that is not top-K.

Random-K draws from the middle of the ranking anywhere in the network, so if the
top-HI layers are also the earliest (as on the toy model), "top-K beats random-K" may
only say "early layers beat others". Depth-K keeps the depths and changes only the HI.

The bands, exactly. Depth is the store's ``layer / (n_layers - 1)`` (0 first, 1 last).
The band of a top-K layer t is every ranked layer l outside top-K with
``|depth(l) - depth(t)| <= band`` (default 0.2: +-2 layers of 12, +-5 of 28). The top-K
layers are matched in order of how few band members they have (then by layer), each to
one member drawn uniformly (seeded) from those not drawn yet. A top layer whose band is
used up is matched to the nearest layers left (drawn among equally near ones) and marked
``widened``. So depth-K has K distinct layers, none in top-K, and each pairs with one
top-K layer.

>>> depth_matched([0, 1, 4], [2, 3, 5, 6, 7], depth=lambda l: l / 11, band=0.2, seed=0)  # doctest: +SKIP
[{'top': 0, 'layer': 2, ...}, {'top': 1, 'layer': 3, ...}, {'top': 4, 'layer': 6, ...}]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

DEFAULT_BAND = 0.2  # half-width of a depth band, in the store's relative depth units


def depth_matched(
    top: Sequence[int], pool: Sequence[int], *, depth: Callable[[int], float], band: float, seed: int
) -> list[dict[str, Any]]:
    """One partner per top layer from ``pool`` (layers outside top-K): pairs in matching order."""
    if len(pool) < len(top):
        raise ValueError(f"depth matching needs {len(top)} layers outside top-K, there are {len(pool)}")
    rng = np.random.default_rng(seed)
    gap = {(t, l): abs(depth(l) - depth(t)) for t in top for l in pool}
    members = {t: [l for l in pool if gap[t, l] <= band + 1e-12] for t in top}
    left, pairs = set(pool), []
    for t in sorted(top, key=lambda t: (len(members[t]), t)):
        choices = [l for l in members[t] if l in left]
        widened = not choices
        if widened:
            nearest = min(gap[t, l] for l in left)
            choices = [l for l in sorted(left) if gap[t, l] <= nearest + 1e-12]
        layer = int(choices[rng.integers(len(choices))])
        left.discard(layer)
        pairs.append({"top": int(t), "layer": layer, "depth_gap": float(gap[t, layer]), "widened": widened})
    return pairs
