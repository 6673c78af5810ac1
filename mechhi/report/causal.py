"""The report's causal-check sections: `mechhi ablate`'s and `mechhi edit`'s results
(``--ablate DIR`` / ``--edit DIR``, or either as ``--experiment``), each as its figure
(`mechhi.figures.causal`), its summary table (every group's change against the unedited
model and the random sets' spread over seeds) and the heads each setup changed.

The tables read the JSON the commands wrote, not the commands: the report runs no model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from markupsafe import Markup

from mechhi import figures
from mechhi.figures.style import dataset_name
from mechhi.report.html import Section, image, join, number, paragraph, table
from mechhi.report.inputs import ReportInput


def plus_minus(mean: Any, se: Any) -> str:
    """``mean ± se`` with signed 3-digit numbers (a change), 'n/a' parts where missing."""
    shown = "n/a" if mean is None else f"{float(mean):+.3g}"
    return shown if se is None else f"{shown} ± {number(se, 2)}"


def spread_cells(seeds: Mapping[str, Any] | None) -> list[str]:
    """sd, range and as-extreme share of the random sets' per-seed values ('-' for a probe's own set)."""
    if seeds is None:
        return ["-", "-", "-"]
    extreme = seeds.get("as_extreme")
    return [
        number(seeds.get("sd"), 2),
        f"{number(seeds['min'], 3)} … {number(seeds['max'], 3)}",
        "n/a" if extreme is None else f"{extreme:.0%}",
    ]


def heads_text(heads: Sequence[Sequence[int]]) -> str:
    return ", ".join(f"L{l} H{h}" for l, h in heads) or "-"


def heads_table(setups: Sequence[Mapping[str, Any]], id: str) -> Markup:
    rows = [
        [
            s["name"],
            heads_text(s["heads"]),
            "-" if s.get("overlap_with_top") is None else s["overlap_with_top"],
        ]
        for s in setups
        if s["heads"]
    ]
    return table(
        ["setup", "heads", "shared with top"],
        rows,
        id=id,
        cls="data causal",
        caption="the heads each setup changed",
    )


def _load(path: Path, kind: str) -> tuple[Path, dict[str, Any]]:
    found, file, data = figures.read_result(path)
    if found != kind:
        raise figures.PlotError(
            f"--{'ablate' if kind == 'ablation' else kind} {path}: "
            f"{file} is {'an' if found[0] in 'aeiou' else 'a'} {found} result"
        )
    return file, data


def _model_name(result: Mapping[str, Any]) -> str:
    """The model's folder or hub name, never the absolute path a result records."""
    return Path(str(result.get("model", ""))).name or "model"


# ---------------------------------------------------------------- ablation
def ablation_rows(result: Mapping[str, Any]) -> list[list[Any]]:
    """One row per (group, metric) of the result's summary."""
    n = result["n_heads"]
    return [
        [
            r["group"] if r.get("seeds") else f"{r['group']}-{n}",
            r["metric"],
            plus_minus(r["change"], r["se"]),
            *spread_cells(r.get("seeds")),
        ]
        for r in result["summary"]
    ]


def ablation(report: ReportInput) -> Section | None:
    if report.ablate is None:
        return None
    file, result = _load(report.ablate, "ablation")
    model = _model_name(result)
    intro = paragraph(
        f"{model}: the {result['probe']} probe's top {result['n_heads']} and bottom {result['n_heads']} "
        f"heads {result['mode']}-ablated, beside random sets with the top set's heads per layer "
        f"(matched) and per depth bin (depth), seeds {result['seeds']}; {result['n_samples']} samples "
        f"of {dataset_name({'dataset': result.get('dataset', '')})} ({file.name})."
    )
    columns = ["setup", "metric", "change ± SE", "sd over seeds", "seed range", "as extreme as top"]
    summary = table(
        columns,
        ablation_rows(result),
        id="ablation",
        cls="data causal",
        caption="change against the unablated model (random groups: mean over seeds)",
    )
    figure = image(figures.results_figure(figures.from_ablation(result)), "ablation results")
    return Section(
        "ablation",
        "Head ablation",
        join([intro, figure, summary, heads_table(result["setups"], "ablation-heads")]),
    )


# ---------------------------------------------------------------- editing
def edit_rows(result: Mapping[str, Any]) -> list[list[Any]]:
    """One row per (group, measure) of the result's summary; the spread is of what ``seeds.of`` names."""
    k = result["k"]
    return [
        [
            r["group"] if r.get("seeds") else f"{r['group']}-{k}",
            r["measure"],
            plus_minus(r["change"], r["change_se"]),
            f"{number(r['ratio'], 3)} ± {number(r['ratio_se'], 2)}",
            r["seeds"]["of"] if r.get("seeds") else "-",
            *spread_cells(r.get("seeds")),
        ]
        for r in result["summary"]
    ]


def _captions(result: Mapping[str, Any]) -> Markup:
    shown = [s for s in result["setups"] if s["kind"] in ("unedited", "top")]
    by_image = [dict(zip([s["name"] for s in shown], row)) for row in zip(*(s["captions"] for s in shown))]
    rows = [
        [row[shown[0]["name"]]["image_id"], *(row[s["name"]]["generated"] for s in shown)] for row in by_image
    ]
    return table(
        ["image", *(s["name"] for s in shown)],
        rows,
        id="edit-captions",
        cls="data causal",
        caption="greedy captions, unedited and edited",
    )


def edit(report: ReportInput) -> Section | None:
    if report.edit is None:
        return None
    file, result = _load(report.edit, "edit")
    model = _model_name(result)
    intro = paragraph(
        f"{model}: the top {result['k']} heads by Head Pursuit for {', '.join(result['words'])} scaled "
        f"by α={result['alpha']:g}, beside random sets with the same heads per layer (seeds "
        f"{result['seeds']}); control words {', '.join(result['control_words']) or '-'}; captions of "
        f"{result['n_images']} images ({file.name})."
    )
    columns = [
        "setup",
        "measure",
        "change ± SE",
        "ratio ± SE",
        "spread of",
        "sd over seeds",
        "seed range",
        "as extreme as top",
    ]
    summary = table(
        columns,
        edit_rows(result),
        id="edit",
        cls="data causal",
        caption="against the unedited captions of the same images (random groups: mean over seeds)",
    )
    ranking = table(
        ["layer", "head", "explained"],
        [[r["layer"], r["head"], number(r["explained"], 3)] for r in result["ranking"]],
        id="edit-ranking",
        cls="data causal",
        caption="the concept's heads by SOMP explained variance",
    )
    figure = image(figures.results_figure(figures.from_edit(result)), "edit results")
    return Section(
        "edit",
        "Head editing",
        join(
            [intro, figure, summary, ranking, heads_table(result["setups"], "edit-heads"), _captions(result)]
        ),
    )
