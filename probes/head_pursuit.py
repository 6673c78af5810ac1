"""Head Pursuit (Basile et al. 2025): which heads write a concept into the residual stream.

A head's signal is its own write into the residual stream (its slice of the attention
output times its slice of W_O), averaged over token positions: one row per sample.
Simultaneous Orthogonal Matching Pursuit (SOMP) then explains those rows with a few
atoms of a dictionary, the unembedding rows of the concept's tokens (colour words,
shape words, ...). The share of the signal's variance the atoms explain is the head's
score for the concept; the chosen atoms, ordered by weight, are what the head "says".

Where the signal is read: the input of each attention module's output projection
(``o_proj``), which is the concatenation of the heads' outputs, so the split by head is
exact. Capturing it is the tracer's job (``mechhi.trace.HeadOutputTracer``); this
module is the math, on plain arrays, labelled at the edge.

Atoms are scaled to unit norm before pursuit, as usual for matching pursuit: otherwise
a token with a large unembedding norm would be picked for its norm, not its direction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr

from probes.registry import Probe, ProbeInputs, register_probe


@dataclass(frozen=True)
class Pursuit:
    """SOMP of one signal: atoms in the order chosen, their coefficients, and the
    explained variance after each step."""

    support: np.ndarray  # (k,) atom indices, in the order chosen
    coefficients: np.ndarray  # (n_samples, k): the least-squares weights on the support
    explained: np.ndarray  # (k,) explained-variance ratio after 1..k atoms

    def ranked_atoms(self) -> np.ndarray:
        """Support atoms by the norm of their coefficients over samples, largest first."""
        return self.support[np.argsort(-np.linalg.norm(self.coefficients, axis=0), kind="stable")]


def somp(signal: np.ndarray, dictionary: np.ndarray, k: int) -> Pursuit:
    """SOMP of ``signal`` (n_samples, d) on ``dictionary`` (n_atoms, d), ``k`` steps.

    The signal is centred over samples. Each step picks the atom whose correlations with
    the residual have the largest L1 norm over samples, refits all coefficients on the
    support by least squares (float64), and updates the residual.
    """
    x = np.asarray(signal, dtype=np.float64)
    d = np.asarray(dictionary, dtype=np.float64)
    if x.ndim != 2 or d.ndim != 2 or x.shape[1] != d.shape[1]:
        raise ValueError(f"somp: signal {x.shape} and dictionary {d.shape} must be (n, d) and (atoms, d)")
    if not 1 <= k <= d.shape[0]:
        raise ValueError(f"somp: k={k} must be between 1 and the number of atoms ({d.shape[0]})")
    norms = np.linalg.norm(d, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("somp: the dictionary has an all-zero atom")
    d = d / norms
    x = x - x.mean(0, keepdims=True)
    total = float((x**2).sum())
    residual = x
    support: list[int] = []
    explained = []
    coefficients = np.zeros((x.shape[0], 0))
    for _ in range(k):
        scores = np.abs(d @ residual.T).sum(1)  # (atoms,): L1 over samples of the correlations
        scores[support] = -np.inf  # orthogonal residual: chosen atoms score ~0 anyway; never twice
        support.append(int(np.argmax(scores)))
        basis = d[support]  # (s, d)
        coefficients = np.linalg.lstsq(basis.T, x.T, rcond=None)[0].T  # (n, s)
        residual = x - coefficients @ basis
        explained.append(1.0 - float((residual**2).sum()) / total if total > 0 else np.nan)
    return Pursuit(np.asarray(support), coefficients, np.asarray(explained))


def random_dictionary(like: np.ndarray, seed: int) -> np.ndarray:
    """Gaussian atoms of the dictionary's shape: a chance reference where no vocabulary is at hand."""
    return np.random.default_rng(seed).normal(size=np.shape(like))


def random_row_ids(
    n_rows: int, count: int, draws: int, *, seed: int = 0, exclude: Sequence[int] = ()
) -> np.ndarray:
    """(draws, count) row indices: ``count`` of ``range(n_rows)`` per draw, without
    replacement within a draw and never one in ``exclude``, sorted, seeded."""
    allowed = np.setdiff1d(np.arange(n_rows), np.asarray(exclude, dtype=int))
    if len(allowed) < count:
        raise ValueError(f"random_rows: {len(allowed)} rows to draw {count} from")
    rng = np.random.default_rng(seed)
    return np.stack([np.sort(rng.choice(allowed, count, replace=False)) for _ in range(draws)])


def random_rows(
    pool: np.ndarray, count: int, draws: int, *, seed: int = 0, exclude: Sequence[int] = ()
) -> np.ndarray:
    """(draws, count, d): ``draws`` dictionaries of ``count`` rows of ``pool`` each
    (`random_row_ids`).

    The control for a concept of ``count`` words is as many random vocabulary rows: they
    share the unembedding's geometry (its anisotropy, its common directions), which a
    Gaussian draw lacks, so the gap to the concept is the concept's, not the vocabulary's.
    """
    return np.asarray(pool)[random_row_ids(len(pool), count, draws, seed=seed, exclude=exclude)]


def pursue_heads(
    signals: xr.DataArray,
    dictionary: np.ndarray,
    words: list[str],
    k: int,
    *,
    controls: np.ndarray | None = None,
    control_seed: int = 0,
    control_draws: int = 10,
) -> xr.Dataset:
    """SOMP for every (layer, head) of ``signals`` (sample, layer, head, hidden) on the
    concept ``dictionary`` (len(words), hidden).

    Returns per (layer, head): ``explained`` (variance ratio after k atoms), ``top_word``
    (the support atom of largest weight), ``explained_curve`` along ``step``, and the
    control: the same pursuit on each of the ``controls`` dictionaries (draw, len(words),
    hidden; `random_rows` of the unembedding), or without them on ``control_draws``
    Gaussian ones (0: no control, NaN). k atoms explain some variance of any signal, more of a
    low-rank one, so a head's score means something only against this: ``explained_control`` per draw,
    ``explained_random`` its median, ``explained_random_q25`` / ``_q75`` its IQR.
    """
    if len(words) != len(dictionary):
        raise ValueError(f"pursue_heads: {len(words)} words for {len(dictionary)} atoms")
    if controls is None:
        drawn = [random_dictionary(dictionary, control_seed + i) for i in range(control_draws)]
        controls = np.stack(drawn) if drawn else np.empty((0, *np.shape(dictionary)))
        kind = "gaussian"
    else:
        kind = "vocabulary rows"
    if controls.ndim != 3 or controls.shape[1:] != np.shape(dictionary):
        raise ValueError(f"pursue_heads: controls {controls.shape} must be (draws, {len(words)}, hidden)")
    values = signals.transpose("sample", "layer", "head", "hidden").values
    n_layers, n_heads = values.shape[1:3]
    curve = np.full((n_layers, n_heads, k), np.nan)
    chance = np.full((n_layers, n_heads, len(controls)), np.nan)
    top = np.empty((n_layers, n_heads), dtype=object)
    for layer in range(n_layers):
        for head in range(n_heads):
            result = somp(values[:, layer, head], dictionary, k)
            curve[layer, head] = result.explained
            top[layer, head] = words[int(result.ranked_atoms()[0])]
            for draw, control in enumerate(controls):
                chance[layer, head, draw] = somp(values[:, layer, head], control, k).explained[-1]
    coords = {name: signals[name].values for name in ("layer", "head") if name in signals.coords}
    if "depth" in signals.coords:
        coords["depth"] = ("layer", signals["depth"].values)
    q25, median, q75 = (
        np.percentile(chance, [25, 50, 75], axis=-1)
        if len(controls)
        else np.full((3, n_layers, n_heads), np.nan)
    )
    return xr.Dataset(
        {
            "explained": (("layer", "head"), curve[..., -1]),
            "explained_random": (("layer", "head"), median),
            "explained_random_q25": (("layer", "head"), q25),
            "explained_random_q75": (("layer", "head"), q75),
            "explained_control": (("layer", "head", "draw"), chance),
            "explained_curve": (("layer", "head", "step"), curve),
            "top_word": (("layer", "head"), top.astype(str)),
        },
        coords={**coords, "step": np.arange(1, k + 1), "draw": np.arange(len(controls))},
        attrs={
            "probe": "head-pursuit",
            "k": k,
            "words": list(words),
            "control": kind,
            "control_draws": len(controls),
            "control_seed": control_seed,
        },
    )


RANK_BY = ("explained", "excess")


def head_ranking(pursuit: xr.Dataset, by: str = "explained") -> xr.DataArray:
    """Heads by explained variance (``by="explained"``), or by its excess over the control's
    median (``"excess"``: a head whose write is low-rank is explained by any few rows, the
    concept's or not), best first, as a 1-D array over a stacked (layer, head) index."""
    if by not in RANK_BY:
        raise ValueError(f"--rank-by {by!r}: choose from {', '.join(RANK_BY)}")
    score = pursuit["explained"] if by == "explained" else pursuit["explained"] - pursuit["explained_random"]
    stacked = score.stack(unit=("layer", "head"))
    order = np.argsort(-stacked.values, kind="stable")
    return stacked.isel(unit=order)


def _probe_score(inputs: ProbeInputs) -> xr.DataArray:
    signals, dictionary = inputs.head_writes()
    # a ranking: no chance reference needed, so no control draws
    return pursue_heads(signals, dictionary, list(inputs.words), inputs.k, control_draws=0)["explained"]


PROBE = register_probe(
    Probe(
        "pursuit",
        ("model", "words"),
        "share of the head's write that SOMP explains with the concept's unembeddings (Basile et al.)",
        _probe_score,
    )
)
