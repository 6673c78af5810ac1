"""The report's statistics and probe-agreement sections.

Statistics: the paper's Kruskal-Wallis tests (which treat one sample's IoU in different
layers as independent values) beside the repeated-measures view of `probes.statistics`:
Friedman tests with images as blocks and Kendall's W, and bootstrap intervals of each
layer's mean HI with its share of resamples in the top K (what `mechhi stats` prints).

Probe agreement: rank correlations between probes' head and layer rankings
(`probes.agreement`). Head Impact and the attention-mass lift come from the store, so the
report computes those; Head Pursuit and the logit lens need the model, so they appear
only from a given ``mechhi rank --compare-probes --json`` result (``--agreement FILE``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from markupsafe import Markup

from mechhi.report.html import Section, join, number, p_value, paragraph, table
from mechhi.report.inputs import ReportInput, StoreEntry, per_store
from mechhi.scoring.probe_scores import probe_scores
from probes import sinks
from probes.agreement import agreement as probe_agreement
from probes.agreement import agreement_records
from probes.head_impact import kruskal_records, kruskal_wallis
from probes.statistics import bootstrap_layers, friedman, records


# ---------------------------------------------------------------- statistics
def kruskal_table(i: int, entry: StoreEntry) -> Markup:
    rows = [
        [
            t["test"],
            number(t["statistic"], 4),
            t["df"],
            p_value(t["p_value"]),
            p_value(t["p_holm"]),
            t["n_values"],
        ]
        for t in kruskal_records(kruskal_wallis(entry.ds))
    ]
    return table(
        ["Kruskal–Wallis", "H", "df", "p-value", "Holm p", "values"],
        rows,
        id=f"kruskal-{i}",
        cls="data statistics",
        caption="the paper's test: one sample's layers and heads counted as "
        "independent values; Holm p adjusted over the four tests",
    )


def friedman_table(i: int, entry: StoreEntry) -> Markup:
    result = friedman(entry.ds)
    rows = [
        [
            t["test"],
            number(t["statistic"], 4),
            t["df"],
            p_value(t["p_value"]),
            p_value(t["p_holm"]),
            number(t["kendall_w"], 3),
            t["n_blocks"],
        ]
        for t in records(result, "test")
    ]
    caption = (
        "images as blocks (an image's IoU averaged over its objects): layers (IoU averaged over "
        f"heads), heads in each layer; Holm p adjusted over the {result.sizes['test']} tests"
    )
    columns = ["Friedman", "χ²", "df", "p-value", "Holm p", "Kendall's W", "blocks"]
    return table(columns, rows, id=f"friedman-{i}", cls="data statistics", caption=caption)


def bootstrap_table(i: int, entry: StoreEntry, k: int, n_resamples: int) -> Markup:
    boot = bootstrap_layers(entry.ds, k=min(k, entry.ds.sizes["layer"]), n_resamples=n_resamples)
    layers = sorted(records(boot, "layer"), key=lambda r: -(r["mean_hi"] if r["mean_hi"] is not None else -1))
    rows = [
        [
            r["layer"],
            number(r["mean_hi"], 4),
            number(r["ci_low"], 3),
            number(r["ci_high"], 3),
            f"{r['top_k_share']:.0%}",
        ]
        for r in layers
    ]
    caption = (
        f"layer mean HI, {boot.attrs['confidence']:.0%} {boot.attrs['method']} interval over "
        f"{boot.attrs['n_units']} {boot.attrs['unit']}s, {boot.attrs['n_resamples']} resamples"
    )
    return table(
        ["layer", "mean HI", "interval low", "interval high", f"in top-{boot.attrs['k']}"],
        rows,
        id=f"bootstrap-{i}",
        cls="data statistics",
        caption=caption,
    )


def sinks_table(i: int, entry: StoreEntry) -> Markup:
    """Visual attention sinks per layer (`probes.sinks`, what `mechhi stats` prints)."""
    if "attention" not in entry.ds.data_vars:
        return paragraph("attention sinks need attention maps; this store was traced with --no-maps", "note")
    s = sinks.summary(sinks.sinks(entry.ds))
    share = lambda x: "n/a" if x is None else f"{x:.1%}"  # noqa: E731
    rows = [
        [r["layer"], share(r["share_with_sinks"]), share(r["mean_sink_share"]), share(r["mean_top_share"])]
        for r in s["layers"]
    ] + [["all", share(s["share_with_sinks"]), share(s["mean_sink_share"]), share(s["mean_top_share"])]]
    caption = (
        f"visual attention sinks: image tokens taking > {s['tau']:g} x a head's mean image attention; "
        f"an even head's top-{s['top_k']} share is {share(s['uniform_top_share'])}, the sinks' mean object "
        f"coverage {share(s['sink_coverage'])}"
    )
    return table(
        ["layer", "(sample, head) with sinks", "sinks' share", f"top-{s['top_k']} share"],
        rows,
        id=f"sinks-{i}",
        cls="data statistics",
        caption=caption,
    )


def statistics(report: ReportInput) -> Section:
    def one(i: int, entry: StoreEntry) -> Markup:
        try:
            boot = bootstrap_table(i, entry, report.top_k, report.n_resamples)
        except ValueError as err:  # fewer than two scored images
            boot = paragraph(f"bootstrap not computed: {err}", "note")
        return join([kruskal_table(i, entry), friedman_table(i, entry), boot, sinks_table(i, entry)])

    note = paragraph(
        "Does Head Impact differ across layers / across heads? The paper's Kruskal–Wallis test "
        "(scipy.stats.kruskal, on per-head HI and on per-sample IoU) beside Friedman tests that take "
        "every image as a block, and bootstrap intervals resampling images; p < 0.001 in bold, "
        "Holm-adjusted p beside the raw one.",
        "note",
    )
    return Section("statistics", "Statistics", join([note, per_store(report, one)]))


# ---------------------------------------------------------------- probe agreement
def agreement_rows(pairs: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    """One row per (level, probe pair), as `agreement_records` lists them; pairs with no
    unit in common (a per-layer knockout at the head level) are left out."""
    return [
        [
            p["level"],
            p["probe"].replace("_", "-"),
            p["other"].replace("_", "-"),
            number(p["spearman"], 3),
            p_value(p["spearman_p"]),
            number(p["kendall"], 3),
            p_value(p["kendall_p"]),
            p["n"],
        ]
        for p in pairs
        if p["n"]
    ]


def store_agreement(ds) -> list[dict[str, Any]]:
    """Head Impact vs attention-mass lift, on heads and on layers, from the store alone."""
    result = probe_agreement(probe_scores(ds, ["head-impact", "attention-mass"], progress=False))
    return agreement_records(result, "head") + agreement_records(result, "layer")


def _agreement_table(id: str, pairs: Sequence[Mapping[str, Any]], caption: str) -> Markup:
    columns = ["level", "probe", "other", "Spearman ρ", "p", "Kendall τ", "p", "units"]
    return table(columns, agreement_rows(pairs), id=id, cls="data agreement", caption=caption)


def _same(path: Path, recorded: Any) -> bool:
    return recorded is not None and Path(str(recorded)).resolve() == path.resolve()


def agreement(report: ReportInput) -> Section:
    used: set[int] = set()

    def one(i: int, entry: StoreEntry) -> Markup:
        for j, (file, payload) in enumerate(report.agreement):
            if _same(entry.path, payload.get("store")):
                used.add(j)
                words = ", ".join(payload.get("words", []))
                causal = [
                    p for p in payload.get("probes", []) if p in ("patching", "attribution", "knockout")
                ]
                with_causal = f"; causal: {', '.join(causal)}" if causal else ""
                return _agreement_table(
                    f"agreement-{i}",
                    payload["pairs"],
                    f"from {file.name}: pursuit / logit lens of {words}{with_causal}",
                )
        if "attention" not in entry.ds.data_vars:
            return paragraph(
                "attention-mass needs attention maps; this store was traced with --no-maps", "note"
            )
        return _agreement_table(
            f"agreement-{i}", store_agreement(entry.ds), "Head Impact vs attention-mass lift, from the store"
        )

    parts = [
        paragraph(
            "Do the probes rank heads (and layers) alike? Spearman ρ and Kendall τ-b between the "
            "probes' scores (probes.agreement); layer level: each probe averaged over heads first.",
            "note",
        ),
        per_store(report, one),
    ]
    for j, (file, payload) in enumerate(report.agreement):
        if j not in used:
            parts.append(
                _agreement_table(
                    f"agreement-file-{j}",
                    payload["pairs"],
                    f"from {file.name} (store {payload.get('store')})",
                )
            )
    if not report.agreement:
        parts.append(
            paragraph(
                "Head Pursuit, the logit lens and the causal results (patching, attribution, "
                "knockout) need model runs: pass --agreement FILE (the output of `mechhi rank --store S "
                "--compare-probes --json`) to include them.",
                "note",
            )
        )
    return Section("agreement", "Probe agreement", join(parts))
