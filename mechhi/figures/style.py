"""One look for every mechhi figure, and one way to write it.

Researchers put these figures in papers, so they share one style (`STYLE`, applied by
`styled`), name models and datasets by short labels (`short_name`, `dataset_name`,
`model_labels`, from `mechhi.store.labels` so `combine` names them alike: an HF id as it
is, a path by its last component, never an absolute path; or the user's, through
`figure_labels`), say in a caption what was measured on what (`provenance_line`: dataset,
sample count, binarisation rule), and are written as PNG, SVG or PDF by the output's extension
(`save`). Figures are `matplotlib.figure.Figure` objects drawn without pyplot, so no
display and no global figure state are involved: rendering is matplotlib's Agg (PNG),
SVG and PDF backends.

>>> short_name({"model": "/home/me/zoo/toy-qwen2vl"})
'toy-qwen2vl'
>>> short_name({"model": "Qwen/Qwen2-VL-2B-Instruct"})
'Qwen/Qwen2-VL-2B-Instruct'
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import matplotlib
from matplotlib.figure import Figure, SubFigure

from mechhi.store.labels import check_labels, dataset_name, model_labels, short_name  # noqa: F401 - re-exported
from mechhi.store.schema import StoreError

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
DEFAULT_DPI = 150
# Perceptually uniform, readable in grey and by colour-blind readers.
SCORE_CMAP = "viridis"  # Head Impact and other scores
# A head's attention over an image: magma reversed, so high attention is dark. Over an object of
# any of the toy's colours (and any mid or light colour) the hot end keeps a luminance contrast
# of at least ~2.7:1 with what it covers; inferno's yellow hot end vanished over a yellow object
# (1.3:1). Over a near-black object the dark-and-light outline of "attention > mean" carries it.
ATTENTION_CMAP = "magma_r"
# Line colours, in order: matplotlib's tab10 (distinct at a glance).
COLOURS = matplotlib.colormaps["tab10"].colors
STYLE: dict[str, Any] = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "figure.titlesize": 11,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "grid.color": "0.9",
    "lines.linewidth": 1.6,
    "lines.markersize": 4,
    "image.cmap": SCORE_CMAP,
    "svg.fonttype": "path",  # the SVG looks the same without the font installed
    "svg.hashsalt": "mechhi",  # stable ids: the same figure gives the same file
    "pdf.fonttype": 42,  # TrueType in PDF, editable in a paper's tooling
}

F = TypeVar("F", bound=Callable[..., Any])


class PlotError(ValueError):
    """A figure that cannot be drawn from what it was given (missing variable, bad selection)."""


def styled(draw: F) -> F:
    """Run a figure-building function inside the mechhi style (rcParams read at creation)."""

    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def new_figure(width: float, height: float) -> Figure:
    """A blank figure of (width, height) inches with constrained layout (nothing clipped)."""
    return Figure(figsize=(width, height), layout="constrained")


def figure_format(out: str | Path) -> str:
    """'png' | 'svg' | 'pdf' from the output's extension; anything else is refused."""
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise PlotError(f"cannot write {Path(out).name!r}: the extension must be one of {', '.join(FORMATS)}")
    return FORMATS[suffix]


def save(fig: Figure, out: str | Path, *, dpi: int = DEFAULT_DPI) -> Path:
    """Write `fig` to `out` in the format its extension names, at `dpi` (raster parts of
    SVG/PDF too); parent folders are created. Dates are left out so reruns give the same file."""
    out = Path(out)
    fmt = figure_format(out)
    if dpi < 10 or dpi > 1200:
        raise PlotError(f"--dpi {dpi}: choose between 10 and 1200")
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"png": {"Software": None}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}[fmt]
    with matplotlib.rc_context(STYLE):
        fig.savefig(out, format=fmt, dpi=dpi, metadata=metadata, facecolor="white")
    return out


# ---------------------------------------------------------------- names
def figure_labels(stores: Sequence[Any], labels: Sequence[str] | None = None) -> list[str]:
    """The labels a figure shows for `stores`: the user's (checked: one distinct label per
    store), else `model_labels`' short readable ones."""
    if labels is None:
        return model_labels(stores)
    try:
        return check_labels(labels, len(stores))
    except StoreError as err:
        raise PlotError(str(err)) from None


def rule_text(attrs: Mapping[str, Any]) -> str:
    """The binarisation rule recorded in the store, in a few words.

    >>> rule_text({"binarize": {"attention": "mean", "mask_threshold": 0.5, "keep_best_token": True}})
    'attention > mean, mask coverage ≥ 0.5 (keep best token)'
    """
    rule = attrs.get("binarize")
    if not isinstance(rule, Mapping):
        return "binarisation rule not recorded"
    keep = " (keep best token)" if rule.get("keep_best_token") else ""
    return (
        f"attention > {rule.get('attention', 'mean')}, "
        f"mask coverage ≥ {rule.get('mask_threshold', 0.5):g}{keep}"
    )


def sample_count(ds: Any) -> int:
    """Samples traced (flagged ``done``), or all samples of a store without the flag."""
    return int(ds["done"].sum()) if "done" in ds.data_vars else int(ds.sizes["sample"])


def provenance_line(ds: Any) -> str:
    """'dataset, N samples, rule': what every store figure says it was measured on."""
    return f"{dataset_name(ds.attrs)}, {sample_count(ds)} samples; {rule_text(ds.attrs)}"


def provenance_notes(stores: Sequence[Any], labels: Sequence[str]) -> list[str]:
    """One provenance line when every store shares it, else one per store after its label."""
    lines = [provenance_line(ds) for ds in stores]
    if len(set(lines)) == 1:
        return lines[:1]
    return [f"{label}: {line}" for label, line in zip(labels, lines)]


def caption(fig: Figure | SubFigure, lines: Sequence[str], *, width: float) -> None:
    """Small grey lines under the figure (provenance), wrapped to the figure's `width` in inches."""
    import textwrap

    per_line = max(20, int(width * 72 / (7.5 * 0.55)))  # characters that fit at 7.5 pt
    wrapped = [piece for line in lines for piece in textwrap.wrap(line, per_line)]
    fig.supxlabel("\n".join(wrapped), fontsize=7.5, color="0.35")
