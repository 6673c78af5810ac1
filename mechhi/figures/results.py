"""Result plots: a metric per setup, with standard-error bars (and, for setups run over
several seeds, the spread across seeds), one panel per metric.

They are drawn from a small schema that any experiment can fill, so the fine-tuning
experiment (Tables 4 and 5), head ablation and head editing share one figure. As JSON
(`ResultTable.from_dict`; `to_dict` writes it back)::

    {"title": "Head ablation on toy-qwen2vl",          # the figure's title
     "baseline": "original",                           # setup drawn as a dashed reference line (or null)
     "setups": ["original", "top-4 heads", "random-4 heads"],      # x axis, in this order
     "metrics": [{"name": "vqa_accuracy", "label": "VQA accuracy ↑",
                  "higher_is_better": true, "log": false}],        # one panel each
     "cells": {"vqa_accuracy": {"original": {"mean": 0.66, "se": 0.03},
                                "random-4 heads": {"mean": 0.51, "se": 0.03,
                                                   "spread_sd": 0.16, "n_seeds": 3}}},
     "notes": ["mean ± SE over test images; sd over seeds"]}      # caption lines

``mean`` and ``se`` are required; ``spread_sd`` (the standard deviation of the per-seed
means) and ``n_seeds`` are optional. A setup missing from a metric's cells is left out of
that panel. `from_experiment` adapts ``mechhi experiment``'s results.json; ablation and
edit results have theirs in `mechhi.figures.causal`, and `load_results`
(`mechhi.figures.result_files`) tells the kinds apart.

>>> table = load_results("experiments/toy")  # doctest: +SKIP
>>> save(results_figure(table), "table4.png")  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from mechhi.figures.style import COLOURS, PlotError, caption, new_figure, styled

LOG_METRICS = {"perplexity"}  # may be drawn on a log axis by the experiment adapter (87 vs 2.3 on the toy)
LOG_SPAN = 3.0  # a log metric's axis is logarithmic when its largest value is this many times its smallest


@dataclass(frozen=True)
class Cell:
    """One setup's value of one metric: mean ± se, and the seed spread when several seeds ran."""

    mean: float
    se: float
    spread_sd: float | None = None
    n_seeds: int = 1

    def __post_init__(self) -> None:
        if not math.isfinite(self.mean) or not (math.isfinite(self.se) and self.se >= 0):
            raise PlotError(
                f"result cell needs a finite mean and se >= 0, got mean={self.mean}, se={self.se}"
            )


@dataclass(frozen=True)
class Metric:
    """A panel: ``label`` is its title; with ``log``, values spanning more than LOG_SPAN x are
    drawn on a log axis (perplexity 87 beside 2.3)."""

    name: str
    label: str
    higher_is_better: bool | None = None
    log: bool = False


@dataclass(frozen=True)
class ResultTable:
    """Setups x metrics (see the module docstring for the JSON form)."""

    title: str
    setups: tuple[str, ...]
    metrics: tuple[Metric, ...]
    cells: Mapping[str, Mapping[str, Cell]]
    baseline: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.cells) - {m.name for m in self.metrics})
        if unknown:
            raise PlotError(f"result cells for metrics not listed in 'metrics': {unknown}")
        for metric, by_setup in self.cells.items():
            strays = sorted(set(by_setup) - set(self.setups))
            if strays:
                raise PlotError(f"metric {metric!r} has cells for setups not listed in 'setups': {strays}")
        if self.baseline is not None and self.baseline not in self.setups:
            raise PlotError(f"baseline {self.baseline!r} is not one of the setups {list(self.setups)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ResultTable:
        try:
            return cls(
                title=str(data.get("title", "results")),
                setups=tuple(data["setups"]),
                metrics=tuple(Metric(**m) for m in data["metrics"]),
                cells={m: {s: Cell(**c) for s, c in by.items()} for m, by in data["cells"].items()},
                baseline=data.get("baseline"),
                notes=tuple(data.get("notes", ())),
            )
        except (KeyError, TypeError) as err:
            raise PlotError(
                f"not a result table ({type(err).__name__}: {err}); see mechhi.figures.results"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["cells"] = {m: {s: asdict(c) for s, c in by.items()} for m, by in self.cells.items()}
        return out


def from_experiment(report: Mapping[str, Any]) -> ResultTable:
    """The result table of ``mechhi experiment``'s results.json (its ``table4`` rows)."""
    rows = report.get("table4")
    if not rows:
        raise PlotError("results.json has no table4 rows")
    setups = tuple(rows[0]["cells"])
    metrics = tuple(
        Metric(r["metric"], r["label"], r.get("higher_is_better"), r["metric"] in LOG_METRICS) for r in rows
    )
    keys = ("mean", "se", "spread_sd", "n_seeds")
    cells = {
        r["metric"]: {
            s: Cell(**{k: c.get(k) for k in keys if c.get(k) is not None}) for s, c in r["cells"].items()
        }
        for r in rows
    }
    model = Path(str(report.get("model", ""))).name or "model"
    dataset = Path(str(report.get("dataset", ""))).name or "dataset"
    return ResultTable(
        title=f"Fine-tuning by Head Impact: {model} on {dataset}",
        setups=setups,
        metrics=metrics,
        cells=cells,
        baseline="original" if "original" in setups else None,
        notes=_notes(cells),
    )


def _notes(cells: Mapping[str, Mapping[str, Cell]]) -> tuple[str, ...]:
    seeded = any(c.spread_sd is not None for by in cells.values() for c in by.values())
    spread = "; light bars: ± sd of the per-seed means" if seeded else ""
    return (f"mean ± SE over test items{spread}",)


def _two_and_five(value: float, _position: int) -> str:
    """Minor log ticks labelled at 2 and 5 times a power of ten only."""
    lead = round(value / 10 ** math.floor(math.log10(value))) if value > 0 else 0
    return f"{value:g}" if lead in (2, 5) else ""


def _panel(ax, table: ResultTable, metric: Metric) -> None:
    """One metric: a point ± SE per setup, the seed spread behind it, the baseline dashed."""
    by_setup = table.cells.get(metric.name, {})
    shown = [s for s in table.setups if s in by_setup]
    x = np.arange(len(shown))
    for i, setup in enumerate(shown):
        cell, colour = by_setup[setup], COLOURS[table.setups.index(setup) % len(COLOURS)]
        if cell.spread_sd is not None:
            ax.errorbar(i, cell.mean, yerr=cell.spread_sd, color=colour, alpha=0.35, linewidth=6, capsize=0)
        ax.errorbar(i, cell.mean, yerr=cell.se, fmt="o", color=colour, capsize=4, markersize=6)
        ax.annotate(
            f"{cell.mean:.3g}",
            (i, cell.mean),
            xytext=(7, 0),
            textcoords="offset points",
            va="center",
            fontsize=7.5,
        )
    if table.baseline in by_setup:
        ax.axhline(by_setup[table.baseline].mean, color="0.5", linestyle="--", linewidth=1, zorder=0)
    values = [by_setup[s].mean for s in shown]
    if metric.log and min(values) > 0 and max(values) > LOG_SPAN * min(values):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 10, not 10^1
        ax.yaxis.set_minor_formatter(FuncFormatter(_two_and_five))
    ax.set_xticks(x, shown, rotation=30, ha="right")
    ax.set_xlim(-0.5, len(shown) - 0.3)
    ax.set_title(metric.label)
    ax.grid(True, axis="y")


@styled
def results_figure(table: ResultTable) -> Figure:
    """One panel per metric, setups along x (see the module docstring)."""
    if not table.metrics:
        raise PlotError("result table has no metrics")
    width = max(4.0, 2.5 * len(table.metrics) + 0.6)
    fig = new_figure(width, 3.4)
    axes = fig.subplots(1, len(table.metrics), squeeze=False)[0]
    for ax, metric in zip(axes, table.metrics):
        _panel(ax, table, metric)
    fig.suptitle(table.title)
    notes = list(table.notes)
    if table.baseline is not None:
        notes.append(f"dashed: {table.baseline}")
    caption(fig, notes, width=width)
    return fig
