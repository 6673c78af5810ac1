"""The order in which training samples are seen: a pure function of (seed, step).

Resume and data parallelism both need to know, without replaying anything, which
samples micro-batch ``j`` holds and which of them rank ``r`` gets. So the samples form
one endless stream, the concatenation of a seeded permutation per epoch, cut into
*global* micro-batches of ``per_rank x world`` samples; rank ``r`` takes the ``r``-th
contiguous part of each. Micro-batch ``j`` is always full (it runs on into the next
epoch), so every rank always has the same number of samples, and 2 ranks x ``b / 2``
see exactly the samples that 1 rank x ``b`` sees, in the same steps.

>>> micro_batch(10, seed=0, index=3, size=4)      # doctest: +SKIP
array([7, 2, 9, 0])                                 # samples 12..15 of the stream
>>> rank_part(np.arange(8), rank=1, world=2)
array([4, 5, 6, 7])
"""

from __future__ import annotations

import numpy as np


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: a pure function of (seed, epoch), so resume is exact."""
    return np.random.default_rng([seed, epoch, 7]).permutation(n)


def micro_batch(n: int, *, seed: int, index: int, size: int) -> np.ndarray:
    """(size,) sample indices of global micro-batch ``index``: stream positions
    ``index * size`` to ``(index + 1) * size``, the stream being epoch after epoch."""
    if n < 1 or size < 1:
        raise ValueError(f"micro_batch: need samples (n={n}) and a batch size (size={size}) of at least 1")
    positions = np.arange(index * size, (index + 1) * size)
    epochs = positions // n
    out = np.empty(size, dtype=np.int64)
    for epoch in np.unique(epochs):  # at most ceil(size / n) + 1 epochs
        here = epochs == epoch
        out[here] = epoch_order(n, seed, int(epoch))[positions[here] % n]
    return out


def rank_part(indices: np.ndarray, *, rank: int, world: int) -> np.ndarray:
    """Rank ``rank``'s contiguous share of a global micro-batch (its length divides by ``world``)."""
    if len(indices) % world:
        raise ValueError(f"a micro-batch of {len(indices)} samples does not split over {world} processes")
    share = len(indices) // world
    return indices[rank * share : (rank + 1) * share]
