"""The causal checks' results as result tables: `mechhi ablate`'s ablate.json and
`mechhi edit`'s edit.json, adapted into `ResultTable` so `results_figure` draws them as
it draws the fine-tuning experiment.

Both JSONs (schemas in ``mechhi.intervene.ablate`` and ``mechhi.intervene.edit``) hold
each setup's change against the unedited model with its paired SE, and a ``summary``
with one row per (setup group, metric) whose random groups carry their spread over
seeds. A figure's setups are those groups, in run order: the unedited model (change 0,
the dashed reference), the probe's heads, then each random control as one point (mean
over seeds ± the mean paired SE) with the seeds' sd behind it. Cells the JSON has no
number for (a ratio to zero words, an SE of one sample) are left out of their panel.

>>> save(
...     results_figure(from_ablation(json.load(open("experiments/ablate/ablate.json")))), "a.png"
... )  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mechhi.figures.results import Cell, Metric, ResultTable

# ablate: metric -> (panel label, higher is better)
ABLATE_METRICS = {
    "perplexity": ("Δ perplexity ↓", False),
    "vqa_accuracy": ("Δ VQA accuracy ↑", True),
    "ans_prob": ("Δ AnsProb ↑", True),
}
# edit: measure -> (panel label, what of it is drawn: the ratio or the change vs unedited)
EDIT_MEASURES = {
    "concept": ("concept words (× unedited)", "ratio"),
    "control": ("control words (× unedited)", "ratio"),
    "concept_precision": ("Δ right concept words", "change"),
    "control_precision": ("Δ right control words", "change"),
}


def _cell(mean: Any, se: Any, seeds: Mapping[str, Any] | None = None) -> Cell | None:
    """A cell, or None when the JSON has no finite mean or SE for it (NaN is written as null)."""
    if mean is None or se is None or not (math.isfinite(mean) and math.isfinite(se)):
        return None
    sd = seeds.get("sd") if seeds else None
    return Cell(
        float(mean), float(se), None if sd is None else float(sd), int(seeds["n_seeds"]) if seeds else 1
    )


def _group_label(group: str, n_heads: int, seeds: Mapping[str, Any] | None) -> str:
    if seeds is None:
        return f"{group}-{n_heads}"
    return f"{group} random ({seeds['n_seeds']} seed{'s' if seeds['n_seeds'] != 1 else ''})"


def _table(
    title: str,
    base: tuple[str, Mapping[str, Any]],
    rows: list[dict[str, Any]],
    key: str,
    metrics: tuple[Metric, ...],
    value: Mapping[str, str],
    n_heads: int,
    notes: tuple[str, ...],
) -> ResultTable:
    """Setups: the unedited model, then one per summary group; ``value[metric]`` names the
    row's field drawn (``change`` or ``ratio``, its SE under ``<field>_se`` or ``se``)."""
    base_name, base_entry = base
    cells: dict[str, dict[str, Cell]] = {m.name: {} for m in metrics}
    setups = [base_name]
    for m in metrics:
        field = value[m.name]
        own = base_entry[field][m.name]
        if (cell := _cell(own["mean"], own["se"])) is not None:
            cells[m.name][base_name] = cell
    for row in rows:
        if row[key] not in cells:
            continue
        label = _group_label(row["group"], n_heads, row.get("seeds"))
        if label not in setups:
            setups.append(label)
        field = value[row[key]]
        se = row.get(f"{field}_se", row.get("se"))
        if (cell := _cell(row[field], se, row.get("seeds"))) is not None:
            cells[row[key]][label] = cell
    return ResultTable(
        title=title, setups=tuple(setups), metrics=metrics, cells=cells, baseline=base_name, notes=notes
    )


def from_ablation(report: Mapping[str, Any]) -> ResultTable:
    """``mechhi ablate``'s result: the change of each metric per setup group against the unablated model."""
    names = [m for m in report["metrics"] if m in ABLATE_METRICS]
    metrics = tuple(Metric(m, *ABLATE_METRICS[m]) for m in names)
    base = next(s for s in report["setups"] if s["kind"] == "unablated")
    model = Path(str(report.get("model", ""))).name or "model"
    title = f"{report['mode']}-ablating heads by {report['probe']}: {model}"
    notes = (
        (
            f"change against the unablated model ± paired SE over {report['n_samples']} samples; "
            "light bars: ± sd over the random sets' seeds"
        ),
    )
    return _table(
        title,
        ("unablated", base),
        report["summary"],
        "metric",
        metrics,
        dict.fromkeys(names, "change"),
        int(report["n_heads"]),
        notes,
    )


def from_edit(report: Mapping[str, Any]) -> ResultTable:
    """``mechhi edit``'s result: word counts as a ratio to the unedited captions' (ratio
    1: no effect), the share of right words as a change (0: no effect)."""
    metrics = tuple(Metric(m, label) for m, (label, _) in EDIT_MEASURES.items())
    base = next(s for s in report["setups"] if s["kind"] == "unedited")
    model = Path(str(report.get("model", ""))).name or "model"
    words = ", ".join(report.get("words", []))
    concept = words if report.get("concept") in (None, "words") else f"{report['concept']} ({words})"
    title = f"Scaling the top heads of {concept} by α={report['alpha']:g}: {model}"
    notes = (
        (
            f"against the unedited captions of the same {report['n_images']} images ± delta-method SE; "
            "light bars: ± sd over the matched random sets' seeds"
        ),
    )
    value = {m: field for m, (_, field) in EDIT_MEASURES.items()}
    return _table(
        title, ("unedited", base), report["summary"], "measure", metrics, value, int(report["k"]), notes
    )
