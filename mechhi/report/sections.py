"""The report's sections, each built by one small function from the report's input.

`SECTIONS` lists them in page order; a function returns a `Section`, or None when it has
nothing to show (no experiment given, say). A new section is one more function appended
there; the statistics and probe-agreement sections live in `report.statistics`, the
ablation and editing ones in `report.causal`.

Head Pursuit needs a model run, so the report never runs it: it shows a pursuit result
when one is given (the JSON of ``mechhi pursuit --json``) beside the store's probes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from markupsafe import Markup
from scipy import stats

from mechhi import figures
from mechhi.figures.overlay import Picture, draw_overlay, sample_picture
from mechhi.figures.style import dataset_name, new_figure, provenance_line, rule_text, sample_count, styled
from mechhi.figures.summaries import scores
from mechhi.report.causal import ablation, edit
from mechhi.report.html import Section, image, join, number, paragraph, render, table
from mechhi.report.inputs import ReportInput, StoreEntry, per_store
from mechhi.report.statistics import agreement, statistics
from probes.attention_mass import attention_mass, layer_means
from probes.attention_mass import layer_ranking as mass_ranking
from probes.head_impact import layer_ranking


# ---------------------------------------------------------------- summary
def _summary_line(entry: StoreEntry) -> str:
    ranking = layer_ranking(entry.ds)
    ((layer, head, hi),) = figures.top_heads(entry.ds, 1)
    return (
        f"{entry.label}: best layer {int(ranking.layer[0])} (mean HI {float(ranking[0]):.3f}), best head "
        f"L{layer} H{head} (HI {hi:.3f}); {provenance_line(entry.ds)}."
    )


def summary(report: ReportInput) -> Section:
    return Section("summary", "Summary", join(paragraph(_summary_line(e)) for e in report.stores))


# ---------------------------------------------------------------- provenance
PROVENANCE_FIELDS = (
    ("store", lambda e: str(e.path)),
    ("model (as recorded)", lambda e: e.ds.attrs.get("model")),
    ("model revision", lambda e: e.ds.attrs.get("model_revision") or "-"),
    ("family", lambda e: e.ds.attrs.get("family", "-")),
    ("dtype", lambda e: e.ds.attrs.get("dtype")),
    ("prompt template", lambda e: e.ds.attrs.get("prompt_template")),
    ("prompt", lambda e: e.ds.attrs.get("prompt", "-")),
    ("dataset", lambda e: e.ds.attrs.get("dataset")),
    ("split", lambda e: e.ds.attrs.get("split", "-")),
    ("samples traced", lambda e: f"{sample_count(e.ds)} of {e.ds.sizes['sample']}"),
    ("records skipped", lambda e: len(e.ds.attrs.get("skipped") or [])),
    ("binarisation", lambda e: rule_text(e.ds.attrs)),
    ("layers x heads", lambda e: f"{e.ds.sizes['layer']} x {e.ds.sizes['head']}"),
    ("created", lambda e: e.ds.attrs.get("created", "-")),
    ("mechhi version", lambda e: e.ds.attrs.get("mechhi_version", "-")),
    ("schema version", lambda e: e.ds.attrs.get("schema_version")),
)


def provenance(report: ReportInput) -> Section:
    """One row per recorded attribute, one column per store: what each was made from."""
    rows = [[name, *(get(e) for e in report.stores)] for name, get in PROVENANCE_FIELDS]
    body = table(["", *(e.label for e in report.stores)], rows, cls="data provenance")
    return Section("provenance", "Provenance", body)


# ---------------------------------------------------------------- ranking
def ranking_rows(ds: xr.Dataset) -> list[list[Any]]:
    """One row per layer, best first: rank, layer, depth, mean HI, SE over heads, best head, its HI."""
    ranking = layer_ranking(ds)
    summary = figures.layer_profile(ds)
    hi = scores(ds)
    rows = []
    for i in range(ranking.sizes["layer"]):
        layer = int(ranking["layer"][i])
        heads = hi.sel(layer=layer)
        best = int(heads.idxmax()) if np.isfinite(heads.values).any() else None
        rows.append(
            [
                int(ranking["rank"][i]),
                layer,
                number(ranking["depth"][i], 3),
                number(ranking[i], 4),
                number(summary["se"].sel(layer=layer), 2),
                "-" if best is None else best,
                "-" if best is None else number(heads.sel(head=best), 3),
            ]
        )
    return rows


def ranking(report: ReportInput) -> Section:
    columns = ["rank", "layer", "depth", "mean HI", "SE over heads", "best head", "its HI"]

    def one(i: int, entry: StoreEntry) -> Markup:
        return table(
            columns,
            ranking_rows(entry.ds),
            id=f"ranking-{i}",
            cls="data ranking",
            caption="layers by mean Head Impact over heads",
        )

    return Section("ranking", "Layer ranking", per_store(report, one))


# ---------------------------------------------------------------- probes
def probe_rows(ds: xr.Dataset) -> tuple[list[list[Any]], float]:
    """Per layer: HI mean and rank beside the attention-mass means and lift rank; Spearman
    rho of the two layer orders."""
    hi_rank = layer_ranking(ds)
    per_sample = attention_mass(ds)
    mass, lift_rank = layer_means(per_sample), mass_ranking(per_sample, "object_lift")
    rows = []
    for layer in ds["layer"].values:
        at = mass.sel(layer=layer)
        rows.append(
            [
                int(layer),
                number(hi_rank.sel(layer=layer), 3),
                int(hi_rank["rank"].sel(layer=layer)),
                number(at["visual_mass"], 3),
                number(at["object_share"], 3),
                number(at["object_lift"], 3),
                int(lift_rank["rank"].sel(layer=layer)),
            ]
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = stats.spearmanr(hi_rank.sortby("layer").values, mass["object_lift"].values, nan_policy="omit")[
            0
        ]
    return rows, float(rho)


def _pursuit_table(pursuit: Mapping[str, Any], ds: xr.Dataset) -> Markup:
    hi = scores(ds)
    rows = [
        [
            h["rank"],
            h["layer"],
            h["head"],
            number(h.get("explained"), 3),
            number(h.get("explained_random"), 3),
            h.get("top_word", "-"),
            number(hi.sel(layer=h["layer"], head=h["head"]), 3),
        ]
        for h in pursuit.get("heads", [])
        if h["layer"] in hi["layer"] and h["head"] in hi["head"]
    ]
    words = ", ".join(pursuit.get("words", []))
    return table(
        ["pursuit rank", "layer", "head", "explained", "by random atoms", "top word", "HI"],
        rows,
        caption=f"Head Pursuit of {words} (k={pursuit.get('k')}) beside Head Impact",
        cls="data pursuit",
    )


def probes(report: ReportInput) -> Section:
    def one(_: int, entry: StoreEntry) -> Markup:
        if "attention" not in entry.ds.data_vars:
            return paragraph(
                "attention-mass needs attention maps; this store was traced with --no-maps", "note"
            )
        rows, rho = probe_rows(entry.ds)
        columns = ["layer", "mean HI", "HI rank", "visual mass", "object share", "object lift", "lift rank"]
        return join(
            [
                table(columns, rows, cls="data probes"),
                paragraph(f"Spearman ρ between the layers' mean HI and mean object lift: {number(rho, 3)}"),
            ]
        )

    parts = [
        paragraph(
            "Head Impact (binarised IoU) beside the threshold-free attention-mass baselines "
            "(probes.attention_mass), per layer, means over heads and samples.",
            "note",
        ),
        per_store(report, one),
    ]
    if report.pursuit:
        parts.append(_pursuit_table(report.pursuit, report.stores[0].ds))
    else:
        parts.append(
            paragraph(
                "Head Pursuit needs a model run: pass --pursuit FILE (the output of "
                "`mechhi pursuit --json`) to show it here.",
                "note",
            )
        )
    return Section("probes", "Probes side by side", join(parts))


# ---------------------------------------------------------------- figures
def gallery_samples(ds: xr.Dataset, n: int) -> list[int]:
    """`n` traced samples spread evenly over the store (the first and the last included)."""
    done = (
        ds["sample"].values[ds["done"].values.astype(bool)] if "done" in ds.data_vars else ds["sample"].values
    )
    if n < 1 or done.size == 0:
        return []
    picks = np.unique(np.linspace(0, done.size - 1, min(n, done.size)).round().astype(int))
    return [int(done[i]) for i in picks]


def _try_figure(report: ReportInput, what: str, draw: Callable[[], Markup]) -> Markup:
    """A figure that needs the dataset's images: a note instead when they cannot be read."""
    try:
        return draw()
    except figures.PlotError as err:
        report.notes.append(f"{what}: {err}")
        return paragraph(f"{what} not drawn: {err}", "note")


def figures_section(report: ReportInput) -> Section:
    stores, labels = [e.ds for e in report.stores], [e.label for e in report.stores]
    parts = [
        image(figures.heatmap_figure(stores, labels=labels), "Head Impact heatmap"),
        image(figures.layers_figure(stores, labels=labels), "Head Impact per layer and per head"),
    ]
    if len(stores) > 1:
        parts.append(
            image(figures.compare_figure(stores, labels=labels), "models compared by relative depth")
        )
    first = stores[0]
    samples = gallery_samples(first, 1)
    if samples and "attention" in first.data_vars:
        layer, head = figures.choose_head(first)

        def overlay() -> Markup:
            fig = figures.overlay_figure(
                first, sample=samples[0], layer=layer, head=head, label=report.stores[0].label
            )
            return image(fig, "overlay of the best head", fmt="png", dpi=150)

        parts.append(_try_figure(report, "overlay", overlay))
    return Section("figures", "Figures", join(parts))


@styled
def _thumbnail(picture: Picture, maps: figures.OverlayMaps) -> Markup:
    """One gallery cell: the head's attention over the image, on the map's own scale."""
    fig = new_figure(1.7, 1.7)
    draw_overlay(fig.subplots(), picture, maps)
    return image(fig, "overlay", fmt="png", dpi=100, cls="thumb")


def _gallery(entry: StoreEntry, samples: list[int], n_heads: int) -> Markup:
    heads = figures.top_heads(entry.ds, n_heads)
    columns = ["sample"] + [f"L{l} H{h} (HI {hi:.2f})" for l, h, hi in heads]
    rows = []
    for s in samples:
        picture = sample_picture(entry.ds, s)
        description = str(entry.ds["description"].sel(sample=s).values)
        cells = [render("{{ d }}<br><span class='note'>sample {{ s }}</span>", d=description, s=s)]
        for layer, head, _ in heads:
            maps = figures.overlay_maps(entry.ds, sample=s, layer=layer, head=head)
            cells.append(join([_thumbnail(picture, maps), f"IoU {maps.iou:.2f}"]))
        rows.append(cells)
    return table(columns, rows, cls="gallery", id="gallery")


def gallery(report: ReportInput) -> Section | None:
    entry = report.stores[0]
    if "attention" not in entry.ds.data_vars:
        return None
    samples = gallery_samples(entry.ds, report.gallery_samples)
    note = paragraph(
        f"{entry.label}: the {report.gallery_heads} heads of highest Head Impact on {len(samples)} "
        "samples; attention as a map, the object outlined, attention > mean dashed.",
        "note",
    )
    body = _try_figure(report, "gallery", lambda: _gallery(entry, samples, report.gallery_heads))
    return Section("gallery", "Gallery", join([note, body]))


# ---------------------------------------------------------------- experiment
def _table4(results: Mapping[str, Any]) -> Markup:
    rows4 = results["table4"]
    groups = list(rows4[0]["cells"]) if rows4 else []
    rows = []
    for row in rows4:
        cells = [row["label"]]
        for g in groups:
            c = row["cells"][g]
            text = f"{number(c['mean'], 4)} ± {number(c['se'], 2)}"
            if c.get("spread_sd") is not None:
                text += f" (sd {number(c['spread_sd'], 2)}, {c['n_seeds']} seeds)"
            cells.append(render("<b>{{ t }}</b>", t=text) if g == row.get("largest_shift") else text)
        rows.append(cells)
    return table(
        ["metric", *groups],
        rows,
        id="table4",
        caption="Table 4: metrics on the test split, mean ± SE (bold: largest shift from original)",
        cls="data experiment",
    )


def _table5(results: Mapping[str, Any]) -> Markup:
    rows = [
        [
            r["setup"],
            ",".join(map(str, r["layers"])) or "-",
            f"{r['total']:,}",
            f"{r['trainable']:,}",
            f"{r['trainable_pct']:.3f}",
        ]
        for r in results["table5"]
    ]
    return table(
        ["setup", "layers", "total", "trainable", "trainable %"],
        rows,
        id="table5",
        caption="Table 5: trainable parameters",
        cls="data experiment",
    )


def _audit(results: Mapping[str, Any]) -> Markup:
    rows = [
        [
            r["setup"],
            ",".join(map(str, r["layers"])),
            f"{number(r['first_loss'])} → {number(r['last_loss'])}",
            f"{number(r['best_val_loss'])} (step {r['best_step']})",
            number(r["lora_B_norm"]),
            number(r.get("probe_shift")),
            "; ".join(r["flags"]) or "ok",
        ]
        for r in results.get("audit", [])
    ]
    return table(
        ["setup", "layers", "loss first → last", "best val loss", "‖lora_B‖", "probe shift", "flags"],
        rows,
        id="audit",
        caption="Audit: did each evaluated model carry its trained adapter?",
        cls="data experiment",
    )


def experiment(report: ReportInput) -> Section | None:
    if report.experiment is None:
        return None
    kind, _, results = figures.read_result(report.experiment)
    if kind != "experiment":
        raise figures.PlotError(
            f"--experiment {report.experiment}: {'an' if kind[0] in 'aeiou' else 'a'} {kind} result, "
            "not `mechhi experiment`'s"
        )
    config = results.get("config", {})
    intro = paragraph(
        f"{Path(str(results.get('model', ''))).name or 'model'} fine-tuned with LoRA on the layers "
        f"each setup names (K={config.get('k')}, random seeds {config.get('random_seeds')}); "
        f"dataset {dataset_name({'dataset': results.get('dataset', '')})}."
    )
    parts = [
        intro,
        image(figures.results_figure(figures.from_experiment(results)), "experiment results"),
        _table4(results),
        _table5(results),
        _audit(results),
    ]
    parts += [paragraph(f"note: {n}", "note") for n in results.get("notes", [])]
    return Section("experiment", "Fine-tuning experiment", join(parts))


SECTIONS: list[Callable[[ReportInput], Section | None]] = [
    summary,
    provenance,
    ranking,
    statistics,
    probes,
    agreement,
    figures_section,
    gallery,
    experiment,
    ablation,
    edit,
]

__all__ = ["SECTIONS", "ReportInput", "StoreEntry"]
