"""Logit lens on each head's write: how much a head, on its own, moves a concept's words.

A head's write into the residual stream (its slice of the attention output times its
slice of W_O, ``mechhi.trace.HeadOutputTracer``) read through the unembedding gives the
logit it adds to every token directly. Restricted to a concept's words (the same
dictionary Head Pursuit uses) this is Head Pursuit's baseline, the logit-lens score:

- ``logit`` (sample, layer, head, word): u_w . x, the direct logit of word w;
- ``mean_logit`` (layer, head): its mean over samples and words, the paper's baseline
  score and this probe's head ranking (a head that raises the concept's words ranks high).

And the bridge to SOMP (``probes.head_pursuit``): SOMP's first step *is* a logit lens on
the centred writes with unit-norm rows. It picks the word whose direction û_w has the
largest summed |û_w . (x_s - x̄)| over samples, and, with one atom, explains the share
sum_s (û_w . (x_s - x̄))^2 / sum_s |x_s - x̄|^2 of the variance. In closed form here:

- ``top_word`` (layer, head): that word;
- ``explained`` (layer, head): that share (SOMP with k = 1 gives the same number).

>>> lens = logit_lens(signals, concept_dictionary(model, adapter, words), words)  # doctest: +SKIP
>>> lens.mean_logit.sel(layer=5)                                                 # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from probes.registry import Probe, ProbeInputs, register_probe


def _one_step(x: np.ndarray, unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SOMP's first step in closed form for (L, H, S, d) writes and (W, d) unit rows ->
    (L, H) index of the chosen word and (L, H) explained-variance share."""
    centred = x - x.mean(axis=2, keepdims=True)  # (L, H, S, d)
    projections = np.einsum("lhsd,wd->lhws", centred, unit)  # (L, H, W, S)
    chosen = np.argmax(np.abs(projections).sum(-1), axis=-1)  # (L, H): largest L1 over samples
    along = np.take_along_axis(projections, chosen[..., None, None], axis=2)[:, :, 0]  # (L, H, S)
    total = (centred**2).sum((-2, -1))  # (L, H)
    with np.errstate(invalid="ignore", divide="ignore"):
        explained = np.where(total > 0, (along**2).sum(-1) / total, np.nan)
    return chosen, explained


def logit_lens(signals: xr.DataArray, dictionary: np.ndarray, words: Sequence[str]) -> xr.Dataset:
    """Logit lens of every head's write ``signals`` (sample, layer, head, hidden) on the
    concept's unembedding rows ``dictionary`` (len(words), hidden); see the module doc."""
    d = np.asarray(dictionary, dtype=np.float64)
    if d.ndim != 2 or len(d) != len(words) or len(words) < 1:
        raise ValueError(f"logit_lens: {len(words)} words for a dictionary of shape {d.shape}")
    norms = np.linalg.norm(d, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("logit_lens: the dictionary has an all-zero row")
    x = signals.transpose("layer", "head", "sample", "hidden").values.astype(np.float64)  # (L, H, S, d)
    if x.shape[-1] != d.shape[1]:
        raise ValueError(f"logit_lens: writes of width {x.shape[-1]}, dictionary rows of width {d.shape[1]}")
    logits = np.einsum("lhsd,wd->slhw", x, d)  # (S, L, H, W)
    chosen, explained = _one_step(x, d / norms)
    coords = {name: signals[name].values for name in ("sample", "layer", "head") if name in signals.coords}
    if "depth" in signals.coords:
        coords["depth"] = ("layer", signals["depth"].values)
    return xr.Dataset(
        {
            "logit": (("sample", "layer", "head", "word"), logits),
            "mean_logit": (("layer", "head"), logits.mean((0, 3))),
            "top_word": (("layer", "head"), np.asarray(words, dtype=str)[chosen]),
            "explained": (("layer", "head"), explained),
        },
        coords={**coords, "word": list(words)},
        attrs={"probe": "logit-lens", "words": list(words)},
    )


def _probe_score(inputs: ProbeInputs) -> xr.DataArray:
    signals, dictionary = inputs.head_writes()
    return logit_lens(signals, dictionary, inputs.words)["mean_logit"]


PROBE = register_probe(
    Probe(
        "logit-lens",
        ("model", "words"),
        "mean direct logit of the concept's words in the head's write",
        _probe_score,
    )
)
