"""How much an edit moves a metric: paired changes with standard errors, and the spread
of the changes over random head sets.

Every setup is measured on the same samples as the unedited model, so a change is a
paired difference: its standard error comes from the per-sample differences, which is
much smaller than combining the two setups' own errors when samples vary more than the
edit does. A metric is a function of a sample mean, ``f(mean(x))``: the identity for
accuracy and probabilities, ``exp`` for perplexity (exp of the mean answer NLL). Its
change ``f(mean x) - f(mean y)`` has, by the delta method, the standard error of the
per-sample values ``f'(mean x) x_i - f'(mean y) y_i``; a ratio ``mean x / mean y`` that
of ``(x_i - ratio y_i) / mean y``; and a change of such a ratio between two setups on the
same samples that of the difference of the two per-sample terms.

Random head sets give one change per seed: their spread (sd, quartiles, range) is the
reference a probe's change is judged against, and ``as_extreme`` the share of seeds
whose change goes at least as far, in the same direction, as the probe's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

TRANSFORMS = {"identity": (lambda m: m, lambda m: 1.0), "exp": (math.exp, math.exp)}


def _se(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def _paired(values: Sequence[float], base: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(values, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or not len(x):
        raise ValueError(
            f"paired change: {x.shape} values against {y.shape} base values (same samples needed)"
        )
    return x, y


def summary(values: Sequence[float], transform: str = "identity") -> dict[str, float]:
    """``f(mean)`` of per-sample values with its (delta-method) standard error."""
    f, slope = TRANSFORMS[transform]
    x = np.asarray(values, dtype=np.float64)
    m = float(x.mean())
    return {"mean": f(m), "se": slope(m) * _se(x), "n": len(x)}


def paired_change(
    values: Sequence[float], base: Sequence[float], transform: str = "identity"
) -> dict[str, float]:
    """``f(mean values) - f(mean base)`` over the same samples, with its paired standard error.

    >>> paired_change([1.0, 2.0, 3.0], [0.5, 1.5, 2.0])["mean"]
    0.6666666666666667
    """
    f, slope = TRANSFORMS[transform]
    x, y = _paired(values, base)
    mx, my = float(x.mean()), float(y.mean())
    return {"mean": f(mx) - f(my), "se": _se(slope(mx) * x - slope(my) * y), "n": len(x)}


def paired_ratio(values: Sequence[float], base: Sequence[float]) -> dict[str, float]:
    """``mean values / mean base`` (NaN when the base mean is 0), with its delta-method SE."""
    x, y = _paired(values, base)
    my = float(y.mean())
    if my == 0:
        return {"mean": float("nan"), "se": float("nan"), "n": len(x)}
    ratio = float(x.mean()) / my
    return {"mean": ratio, "se": _se((x - ratio * y) / my), "n": len(x)}


def ratio_change(
    values: Sequence[float],
    counts: Sequence[float],
    base_values: Sequence[float],
    base_counts: Sequence[float],
) -> dict[str, float]:
    """``sum values / sum counts`` minus the same of the base, over the same samples, with
    the paired delta-method SE (e.g. the share of a caption set's colour words that are
    right, edited minus unedited). NaN when either has no counts."""
    x, n = _paired(values, counts)
    y, m = _paired(base_values, base_counts)
    _paired(x, y)
    if n.sum() == 0 or m.sum() == 0:
        return {"mean": float("nan"), "se": float("nan"), "n": len(x)}
    r1, r0 = x.sum() / n.sum(), y.sum() / m.sum()
    terms = (x - r1 * n) / n.mean() - (y - r0 * m) / m.mean()
    return {"mean": float(r1 - r0), "se": _se(terms), "n": len(x)}


def seed_spread(
    changes: Sequence[float], probe: float | None = None, *, centre: float = 0.0
) -> dict[str, float | int | None]:
    """Mean, sd, quartiles and range of per-seed changes; with ``probe``, the share of seeds
    whose change is at least as far from ``centre`` (no effect: 0 for a change, 1 for a
    ratio) as the probe's, in the probe's direction."""
    c = np.asarray(changes, dtype=np.float64)
    if not len(c):
        raise ValueError("seed_spread: no seeds")
    q25, median, q75 = (float(v) for v in np.quantile(c, [0.25, 0.5, 0.75]))
    out: dict[str, float | int | None] = {
        "mean": float(c.mean()),
        "sd": float(c.std(ddof=1)) if len(c) > 1 else float("nan"),
        "median": median,
        "q25": q25,
        "q75": q75,
        "min": float(c.min()),
        "max": float(c.max()),
        "n_seeds": len(c),
    }
    if probe is not None and math.isfinite(probe):
        out["as_extreme"] = float(np.mean(c <= probe if probe < centre else c >= probe))
    return out
