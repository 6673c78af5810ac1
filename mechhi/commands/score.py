"""The score stage's commands: `mechhi rank`, `mechhi stats`, `mechhi pursuit`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mechhi.commands.app import app
from mechhi.commands.common import (
    BatchSizeOpt,
    DeviceOpt,
    DtypeOpt,
    ExcludeSinksOpt,
    JsonOpt,
    KeepBestOpt,
    MaskThresholdOpt,
    SinkTauOpt,
    StoreOpt,
    ToyDatasetOpt,
    ToyModelOpt,
    TraceSplitOpt,
    _finite,
    concept_words,
    console,
    err_console,
    friendly_errors,
    open_traced,
    print_json,
    scored,
)


@app.command()
@friendly_errors
def rank(
    store: StoreOpt,
    probe: Annotated[
        str,
        typer.Option(
            help="Scoring probe: head-impact, attention-mass (soft baselines: "
            "layers by the object's share of image attention over its area share), "
            "or spatial-entropy (Kang et al.'s localization heads: focused maps of "
            "heads that look at the image)."
        ),
    ] = "head-impact",
    top: Annotated[
        int | None, typer.Option(min=1, help="Show only the K best layers (with --json: and their heads).")
    ] = None,
    mask_threshold: MaskThresholdOpt = 0.5,
    keep_best: KeepBestOpt = True,
    exclude_sinks: ExcludeSinksOpt = False,
    sink_tau: SinkTauOpt = 20.0,
    per_sample_k: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="spatial-entropy: heads selected per sample "
            "(default: 10, at most a quarter of the candidates).",
        ),
    ] = None,
    compare_probes: Annotated[
        bool,
        typer.Option(
            "--compare-probes",
            help="Instead: rank correlations (Spearman, "
            "Kendall) between the head rankings of head-impact, attention-mass, "
            "spatial-entropy, pursuit and logit-lens (the last two run the "
            "store's model), and the patching, attribution and knockout results "
            "beside the store where they exist.",
        ),
    ] = False,
    words: Annotated[
        str | None,
        typer.Option(
            help="With --compare-probes: the pursuit / logit-lens concept (default: the toy world's colours)."
        ),
    ] = None,
    change: Annotated[
        str | None,
        typer.Option(
            help="With --compare-probes: which `mechhi patch --change` result "
            "beside the store to include (needed when there are several)."
        ),
    ] = None,
    knockout: Annotated[
        Path | None,
        typer.Option(
            help="With --compare-probes: a `mechhi knockout --window 1` knockout.json, included per layer."
        ),
    ] = None,
    knockout_pair: Annotated[
        str,
        typer.Option(
            help="With --knockout: the group pair whose per-layer drop in the "
            "answer's log-probability scores a layer."
        ),
    ] = "image->description",
    device: DeviceOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Rank layers by mean Head Impact over heads (best first), or by an attention-mass baseline.

    With --json also every head of the layers shown, best first: its score, standard error over samples and n.
    """
    if compare_probes:
        return print_probe_agreement(
            store, words, device, as_json, change=change, knockout=knockout, knockout_pair=knockout_pair
        )
    from probes.registry import get_probe

    chosen = get_probe(probe, model=False)  # rank reads the store alone
    if probe == "head-impact":
        from probes.head_impact import layer_ranking

        ds = scored(store, mask_threshold, keep_best, exclude_sinks, sink_tau)
        ranking = layer_ranking(ds)
        columns = {"mean_hi": ranking}
        per_head, head_key = ds["iou"], "hi"
        extra = {"binarize": ds.attrs.get("binarize")}
        title = "Head Impact"
    elif probe == "spatial-entropy":
        ds, ranking, columns, extra = localization_ranking(store, per_sample_k)
        per_head, head_key = None, None  # its heads: the selection in `extra`
        title = "Spatial entropy (localization heads, Kang et al. 2025)"
    elif probe == "attention-mass":
        from probes.attention_mass import MEASURES, attention_mass, layer_means
        from probes.attention_mass import layer_ranking as mass_ranking

        ds = open_traced(store)
        mass = attention_mass(ds)
        ranking, per_layer = mass_ranking(mass), layer_means(mass)  # means of an (S, L, H) array: cheap twice
        columns = {f"mean_{m}": per_layer[m].sel(layer=ranking.layer) for m in reversed(MEASURES)}
        per_head, head_key = mass["object_lift"], "object_lift"
        extra, title = {}, "Attention mass (object lift = object share / object area share)"
    else:  # any other registered probe: its (layer, head) scores, layers by their mean over heads
        from mechhi.scoring.probe_scores import probe_scores
        from probes.maps import mean_over, rank_layers

        ds = open_traced(store)
        per_layer = mean_over(probe_scores(ds, [probe], progress=False)[chosen.variable], "head")
        ranking = rank_layers(per_layer, f"mean_{chosen.variable}")
        columns, per_head, head_key, extra, title = (
            {f"mean_{chosen.variable}": ranking},
            None,
            None,
            {},
            chosen.summary,
        )
    columns = {name: values.compute() for name, values in columns.items()}  # one read, not one per cell
    rows = [
        {
            "rank": i + 1,
            "layer": int(layer),
            "depth": float(ranking.depth[i]),
            **{name: _finite(values[i]) for name, values in columns.items()},
        }
        for i, layer in enumerate(ranking.layer.values)
    ]
    shown = rows[:top] if top else rows
    if as_json:
        print_json(
            {
                "store": str(store),
                "model": ds.attrs.get("model"),
                "probe": probe,
                **extra,
                "samples_done": int(ds.done.sum()),
                "n_layers": len(rows),
                "layers": shown,
                **(
                    {}
                    if per_head is None
                    else {"heads": head_rows(per_head, head_key, [row["layer"] for row in shown])}
                ),
            }
        )
        return
    table = Table(title=f"{title} by layer: {ds.attrs.get('model')}")
    headers = {
        "mean_hi": "mean HI",
        "mean_object_lift": "object lift",
        "mean_object_share": "object share",
        "mean_visual_mass": "visual mass",
        "mean_selection_frequency": "selected",
        "mean_spatial_entropy": "entropy",
    }
    for column in ("rank", "layer", "depth", *(headers.get(name, name) for name in columns)):
        table.add_column(column, justify="right")
    for row in shown:
        values = ["n/a" if row[name] is None else f"{row[name]:.4f}" for name in columns]
        table.add_row(str(row["rank"]), str(row["layer"]), f"{row['depth']:.2f}", *values)
    console.print(table)
    if probe == "spatial-entropy":
        print_localization_heads(extra)


def localization_ranking(store, per_sample_k: int | None) -> tuple:
    """rank --probe spatial-entropy: (store, layer ranking, its columns, the JSON's selection
    and chosen heads)."""
    from probes.maps import mean_over
    from probes.spatial_entropy import chosen_heads, layer_ranking, localization, select_heads

    ds = open_traced(store)
    selection = select_heads(localization(ds), per_sample_k).compute()
    ranking = layer_ranking(selection)
    measures = ("selection_frequency", "mean_spatial_entropy", "mean_visual_mass")
    per_layer = mean_over(selection[list(measures)], "head").sel(layer=ranking.layer)
    columns = {
        "mean_selection_frequency": per_layer["selection_frequency"],
        "mean_spatial_entropy": per_layer["mean_spatial_entropy"],
        "mean_visual_mass": per_layer["mean_visual_mass"],
    }
    heads = [
        {"layer": l, "head": h, **{k: _finite(selection[k].sel(layer=l, head=h)) for k in measures}}
        for l, h in chosen_heads(selection)
    ]
    return ds, ranking, columns, {"selection": dict(selection.attrs), "heads": heads}


def sink_summary(ds, tau: float) -> dict | None:
    """`probes.sinks.summary` of the store (None for a store traced without maps)."""
    from mechhi.store import attention_name
    from probes import sinks

    return sinks.summary(sinks.sinks(ds, tau)) if attention_name("image") in ds.data_vars else None


def print_sinks(summary: dict | None) -> None:
    if summary is None:
        console.print("attention sinks: not measured (the store has no attention maps)")
        return
    share = lambda x: "n/a" if x is None else f"{x:.1%}"  # noqa: E731
    table = Table(
        title=f"Visual attention sinks: tokens taking > {summary['tau']:g} x a head's mean image attention "
        f"({summary['samples']} samples)"
    )
    for column in ("layer", "heads with sinks", "sinks' share", f"top-{summary['top_k']} share"):
        table.add_column(column, justify="right")
    for row in summary["layers"]:
        table.add_row(
            str(row["layer"]),
            share(row["share_with_sinks"]),
            share(row["mean_sink_share"]),
            share(row["mean_top_share"]),
        )
    table.add_row(
        "all",
        share(summary["share_with_sinks"]),
        share(summary["mean_sink_share"]),
        share(summary["mean_top_share"]),
    )
    console.print(table)
    console.print(
        f"heads with sinks: share of (sample, head) pairs with a sink; sinks' share: of the head's image "
        f"attention; top-{summary['top_k']} share: an even head gets {share(summary['uniform_top_share'])}; "
        f"mean object coverage of the sink tokens {share(summary['sink_coverage'])}."
    )


def print_localization_heads(extra: dict) -> None:
    """rank --probe spatial-entropy: the chosen heads under the layer table."""
    chosen = extra["selection"]
    table = Table(
        title=f"Localization heads: {chosen['n_selected']} chosen of {chosen['n_candidates']} candidates "
        f"(image attention >= {chosen['mass_threshold']:.3f}; {chosen['per_sample_k']} per sample "
        f"over {chosen['samples']} samples; selected >= {chosen['frequency_threshold']:.3f})"
    )
    for column in ("layer", "head", "selected", "mean entropy", "image attention"):
        table.add_column(column, justify="right")
    for row in extra["heads"]:
        shown = [
            "n/a" if row[k] is None else f"{row[k]:.3f}"
            for k in ("selection_frequency", "mean_spatial_entropy", "mean_visual_mass")
        ]
        table.add_row(str(row["layer"]), str(row["head"]), *shown)
    console.print(table)
    console.print(
        "selected: share of samples whose lowest-entropy candidates hold the head; thresholds at the "
        "elbows of the sorted image attention and selection frequencies."
    )


def head_rows(per_sample, key: str, layers: list[int]) -> list[dict]:
    """Every head of ``layers``, best first: its score (the mean over samples of
    ``per_sample``, (sample, layer, head)) as ``key``, its standard error and n."""
    from probes.maps import sample_summary

    summary = sample_summary(per_sample.sel(layer=layers)).compute()  # one read, not three per head
    rows = []
    for layer in layers:
        for head in summary["head"].values:
            cell = summary.sel(layer=layer, head=head)
            rows.append(
                {
                    "layer": int(layer),
                    "head": int(head),
                    key: _finite(cell["mean"]),
                    "se": _finite(cell["se"]),
                    "n": int(cell["n"]),
                }
            )
    rows.sort(key=lambda r: -r[key] if r[key] is not None else float("inf"))
    return [{"rank": i + 1, **row} for i, row in enumerate(rows)]


@app.command()
@friendly_errors
def pursuit(
    model: ToyModelOpt = None,
    dataset: ToyDatasetOpt = None,
    words: Annotated[
        str | None,
        typer.Option(
            help="The concept: comma-separated single-token words (default: the toy world's colours)."
        ),
    ] = None,
    k: Annotated[
        int, typer.Option(min=1, help="SOMP steps: concept atoms per head (at most the number of words).")
    ] = 3,
    positions: Annotated[
        str,
        typer.Option(
            help="Average each head's write over the image tokens, or the answer (description) tokens."
        ),
    ] = "image",
    limit: Annotated[int | None, typer.Option(min=2, help="Use only the first N samples.")] = None,
    batch_size: BatchSizeOpt = 4,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    split: TraceSplitOpt = "auto",
    top: Annotated[
        int, typer.Option(min=1, help="Show the K heads whose writes the concept explains best.")
    ] = 10,
    control_draws: Annotated[
        int,
        typer.Option(
            min=0,
            help="Control: this many dictionaries of as many random "
            "vocabulary rows as words; median and IQR.",
        ),
    ] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the control's draws.")] = 0,
    rank_by: Annotated[
        str,
        typer.Option(
            help="Order heads by explained variance, or by its excess over the control's median (excess)."
        ),
    ] = "explained",
    as_json: JsonOpt = False,
) -> None:
    """Head Pursuit (Basile et al. 2025): heads ranked by how much of their residual-stream
    write a few of the concept words' unembedding directions explain (SOMP)."""
    from mechhi.bundled import BUNDLED_DATASET_ID, BUNDLED_MODEL_ID
    from mechhi.scoring.pursuit import PursuitConfig, run_pursuit
    from probes.head_pursuit import RANK_BY, head_ranking

    if rank_by not in RANK_BY:
        raise ValueError(f"--rank-by {rank_by!r}: choose from {', '.join(RANK_BY)}")
    config = PursuitConfig(
        model=model or BUNDLED_MODEL_ID,
        dataset=str(dataset) if dataset else BUNDLED_DATASET_ID,
        words=concept_words(words),
        k=k,
        positions=positions,
        limit=limit,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        split=split,
        control_draws=control_draws,
        control_seed=seed,
    )
    result = run_pursuit(config, progress=True)  # the bar is on stderr: --json stays clean
    ranking = head_ranking(result, by=rank_by)
    rows = []
    for i in range(ranking.sizes["unit"]):
        layer, head = int(ranking["layer"][i]), int(ranking["head"][i])
        at = result.sel(layer=layer, head=head)
        rows.append(
            {
                "rank": i + 1,
                "layer": layer,
                "head": head,
                "explained": _finite(at.explained),
                "explained_random": _finite(at.explained_random),
                "explained_random_iqr": [_finite(at.explained_random_q25), _finite(at.explained_random_q75)],
                "top_word": str(at.top_word.values),
            }
        )
    if as_json:
        print_json(
            {
                "model": config.model,
                "dataset": config.dataset,
                "words": list(config.words),
                "k": config.k,
                "positions": config.positions,
                "samples": result.attrs["samples"],
                "control": {"kind": result.attrs["control"], "draws": config.control_draws, "seed": seed},
                "rank_by": rank_by,
                "heads": rows[:top],
            }
        )
        return
    table = Table(
        title=f"Head Pursuit of {', '.join(config.words)} (k={config.k}, {config.positions} tokens)"
    )
    for column in ("rank", "layer", "head", "explained variance", "random rows (median)", "IQR", "top word"):
        table.add_column(column, justify="right")
    for row in rows[:top]:
        shown = [
            "n/a" if row[key] is None else f"{row[key]:.3f}" for key in ("explained", "explained_random")
        ]
        low, high = row["explained_random_iqr"]
        iqr = "n/a" if low is None else f"{low:.3f}-{high:.3f}"
        table.add_row(str(row["rank"]), str(row["layer"]), str(row["head"]), *shown, iqr, row["top_word"])
    console.print(table)
    console.print(
        f"random rows: the same pursuit on {config.control_draws} draws of {len(config.words)} random "
        "vocabulary rows each (never a concept word), the chance reference: median and IQR."
    )


@app.command()
@friendly_errors
def stats(
    store: StoreOpt,
    mask_threshold: MaskThresholdOpt = 0.5,
    keep_best: KeepBestOpt = True,
    top_k: Annotated[int, typer.Option(min=1, help="K of the bootstrap's top-K shares.")] = 3,
    resample: Annotated[
        str, typer.Option(help="Bootstrap unit: image (an image's samples together) or sample.")
    ] = "image",
    blocks: Annotated[
        str,
        typer.Option(
            help="Friedman blocks: image (an image's IoU averaged over its "
            "objects, which share it) or sample (each object alone)."
        ),
    ] = "image",
    n_resamples: Annotated[int, typer.Option(min=100, help="Bootstrap resamples.")] = 2000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    exclude_sinks: ExcludeSinksOpt = False,
    sink_tau: SinkTauOpt = 20.0,
    as_json: JsonOpt = False,
) -> None:
    """Statistics of Head Impact across layers and heads.

    Friedman tests (images as blocks) and bootstrap intervals of each layer's mean HI,
    beside the paper's Kruskal-Wallis tests (see docs/statistics.md in the repository).
    Holm-adjusted p-values stand beside the raw ones of each table's tests.
    """
    from probes.head_impact import kruskal_records, kruskal_wallis

    blocks = _unit("--blocks", blocks)
    resample = _unit("--resample", resample)
    ds = scored(store, mask_threshold, keep_best, exclude_sinks, sink_tau)
    tests = kruskal_records(kruskal_wallis(ds))
    repeated = repeated_measures(ds, top_k, resample, n_resamples, seed, blocks)
    sinks = sink_summary(ds, sink_tau)
    if as_json:
        print_json(
            {
                "store": str(store),
                "model": ds.attrs.get("model"),
                "kruskal_wallis": tests,
                **repeated,
                "sinks": sinks,
            }
        )
        return
    print_repeated_measures(repeated)
    print_sinks(sinks)
    table = Table(
        title="Kruskal-Wallis (the paper's test; on iou it treats one sample's layers and heads "
        "as independent)"
    )
    for column in ("across", "on", "statistic", "df", "p-value", "Holm p"):
        table.add_column(column, justify="right")
    for t in tests:
        shown_stat = "n/a" if t["statistic"] is None else f"{t['statistic']:.2f}"
        table.add_row(t["across"], t["on"], shown_stat, str(t["df"]), _p(t["p_value"]), _p(t["p_holm"]))
    console.print(table)
    console.print(
        "p < 0.001 in green. Holm p: adjusted over the tests of its table. n/a: fewer than two "
        "non-empty groups or all values equal."
    )


# ---------------------------------------------------------------- repeated measures, probe agreement
def _p(p: float | None) -> str:
    """A p-value cell: green below 0.001; '< 5e-324' only where float64 itself underflows."""
    from probes.statistics import p_text

    return f"[bold green]{p_text(p)}[/]" if p is not None and p < 0.001 else p_text(p)


def _unit(option: str, value: str) -> str:
    """A statistics unit option: image or sample (the plurals accepted), else one error line naming it."""
    from probes.statistics import UNITS

    unit = value.strip().lower().removesuffix("s")
    if unit not in UNITS:
        raise ValueError(f"{option}: unknown unit {value!r}; choose from {', '.join(UNITS)}")
    return unit


BLOCKS_TITLE = {
    "image": "images as blocks, each image's IoU averaged over its objects",
    "sample": "samples as blocks; the objects of one image are not independent",
}


def repeated_measures(
    ds, top_k: int, resample: str, n_resamples: int, seed: int, blocks: str = "image"
) -> dict:
    """Friedman tests and bootstrap layer intervals of a scored store, as JSON-ready records."""
    from probes.statistics import bootstrap_layers, friedman, records

    boot = bootstrap_layers(ds, k=top_k, n_resamples=n_resamples, unit=resample, seed=seed)
    return {
        "friedman_blocks": blocks,
        "friedman": records(friedman(ds, unit=blocks), "test"),
        "bootstrap": {**boot.attrs, "layers": records(boot, "layer")},
    }


def print_repeated_measures(repeated: dict) -> None:
    table = Table(title=f"Friedman ({BLOCKS_TITLE[repeated['friedman_blocks']]})")
    for column in ("test", "statistic", "df", "p-value", "Holm p", "Kendall's W", "blocks"):
        table.add_column(column, justify="right")
    for t in repeated["friedman"]:
        statistic, w = t["statistic"], t["kendall_w"]
        table.add_row(
            t["test"],
            "n/a" if statistic is None else f"{statistic:.2f}",
            str(t["df"]),
            _p(t["p_value"]),
            _p(t["p_holm"]),
            "n/a" if w is None else f"{w:.3f}",
            str(t["n_blocks"]),
        )
    console.print(table)
    boot = repeated["bootstrap"]
    table = Table(
        title=f"Layer mean HI, {boot['confidence']:.0%} bootstrap interval over {boot['n_units']} "
        f"{boot['unit']}s ({boot['n_resamples']} resamples)"
    )
    for column in ("layer", "mean HI", "interval", f"in top-{boot['k']}"):
        table.add_column(column, justify="right")
    for row in sorted(boot["layers"], key=lambda r: -(r["mean_hi"] if r["mean_hi"] is not None else -1)):
        low, high = row["ci_low"], row["ci_high"]
        interval = "n/a" if low is None or high is None else f"{low:.3f} - {high:.3f}"
        mean = "n/a" if row["mean_hi"] is None else f"{row['mean_hi']:.4f}"
        table.add_row(str(row["layer"]), mean, interval, f"{row['top_k_share']:.0%}")
    console.print(table)


def print_probe_agreement(
    store,
    words: str | None,
    device: str,
    as_json: bool,
    *,
    change: str | None = None,
    knockout: Path | None = None,
    knockout_pair: str = "image->description",
) -> None:
    """`rank --compare-probes`: every probe's head scores and the causal results beside the
    store (`mechhi.flow.causal_scores`), then their rank correlations."""
    from mechhi.flow.causal_scores import causal_scores
    from mechhi.scoring.probe_scores import ModelProbeSettings, probe_scores
    from probes.agreement import agreement, agreement_records

    ds = open_traced(store)
    settings = ModelProbeSettings(words=concept_words(words), device=device)
    causal, missing = causal_scores(
        ds, Path(store), change=change, knockout=knockout, knockout_pair=knockout_pair
    )
    for note in missing:
        err_console.print(f"[yellow]not included[/]: {note}", highlight=False)
    scores = probe_scores(ds, settings=settings, progress=not as_json).assign(causal)
    result = agreement(scores)
    rows = agreement_records(result, "head") + agreement_records(result, "layer")
    if as_json:
        print_json(
            {
                "store": str(store),
                "model": ds.attrs.get("model"),
                "words": list(settings.words),
                "n_heads": int(result.n.sel(level="head").max()),
                "probes": [str(p) for p in scores.data_vars],
                "causal": {
                    "change": change,
                    "knockout": str(knockout) if knockout else None,
                    "knockout_pair": knockout_pair if knockout else None,
                    "missing": missing,
                },
                "pairs": rows,
            }
        )
        return
    for level in ("head", "layer"):
        table = Table(
            title=f"Probe agreement on {level} rankings (Spearman rho, Kendall tau): {ds.attrs.get('model')}"
        )
        for column in ("probe", "other"):
            table.add_column(column, no_wrap=True)
        for column in ("rho", "p", "tau", "p", f"{level}s"):
            table.add_column(column, justify="right")
        for r in (r for r in rows if r["level"] == level and r["n"]):
            shown = ["n/a" if r[key] is None else f"{r[key]:+.3f}" for key in ("spearman", "kendall")]
            table.add_row(
                r["probe"].replace("_", "-"),
                r["other"].replace("_", "-"),
                shown[0],
                _p(r["spearman_p"]),
                shown[1],
                _p(r["kendall_p"]),
                str(r["n"]),
            )
        console.print(table)
    console.print(
        f"pursuit / logit-lens: concept {', '.join(settings.words)}; layer level: each probe's scores "
        "averaged over heads first" + ("; knockout: per layer only." if knockout else ".")
    )
