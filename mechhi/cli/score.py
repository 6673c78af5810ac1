"""The score stage's commands: `mechhi rank`, `mechhi stats`, `mechhi pursuit`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from .app import app
from .common import (
    BatchSizeOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    KeepBestOpt,
    MaskThresholdOpt,
    StoreOpt,
    ToyDatasetOpt,
    ToyModelOpt,
    TraceSplitOpt,
    _finite,
    console,
    friendly_errors,
    open_traced,
    print_json,
    scored,
)  # fmt: skip

PROBES = ("head-impact", "attention-mass")


@app.command()
@friendly_errors
def rank(
    store: StoreOpt,
    probe: Annotated[str, typer.Option(help="Scoring probe: head-impact, or attention-mass (soft baselines: "
                                            "layers by the object's share of image attention over its area share).")] = "head-impact",
    top: Annotated[Optional[int], typer.Option(min=1, help="Show only the K best layers.")] = None,
    mask_threshold: MaskThresholdOpt = 0.5,
    keep_best: KeepBestOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """Rank layers by mean Head Impact over heads (best first), or by an attention-mass baseline."""
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; available: {', '.join(PROBES)}")
    if probe == "head-impact":
        from probes.head_impact import layer_ranking

        ds = scored(store, mask_threshold, keep_best)
        ranking = layer_ranking(ds)
        columns = {"mean_hi": ranking}
        extra = {"binarize": ds.attrs.get("binarize")}
        title = "Head Impact"
    else:
        from probes.attention_mass import MEASURES, attention_mass, layer_means
        from probes.attention_mass import layer_ranking as mass_ranking

        ds = open_traced(store)
        mass = attention_mass(ds)
        ranking, per_layer = mass_ranking(mass), layer_means(mass)  # means of an (S, L, H) array: cheap twice
        columns = {f"mean_{m}": per_layer[m].sel(layer=ranking.layer) for m in reversed(MEASURES)}
        extra, title = {}, "Attention mass (object lift = object share / object area share)"
    rows = [
        {"rank": i + 1, "layer": int(layer), "depth": float(ranking.depth[i]),
         **{name: _finite(values[i]) for name, values in columns.items()}}
        for i, layer in enumerate(ranking.layer.values)
    ]  # fmt: skip
    shown = rows[:top] if top else rows
    if as_json:
        print_json({"store": str(store), "model": ds.attrs.get("model"), "probe": probe, **extra,
                    "samples_done": int(ds.done.sum()), "n_layers": len(rows), "layers": shown})  # fmt: skip
        return
    table = Table(title=f"{title} by layer: {ds.attrs.get('model')}")
    headers = {"mean_hi": "mean HI", "mean_object_lift": "object lift", "mean_object_share": "object share",
               "mean_visual_mass": "visual mass"}  # fmt: skip
    for column in ("rank", "layer", "depth", *(headers[name] for name in columns)):
        table.add_column(column, justify="right")
    for row in shown:
        values = ["n/a" if row[name] is None else f"{row[name]:.4f}" for name in columns]
        table.add_row(str(row["rank"]), str(row["layer"]), f"{row['depth']:.2f}", *values)
    console.print(table)


@app.command()
@friendly_errors
def pursuit(
    model: ToyModelOpt = None,
    dataset: ToyDatasetOpt = None,
    words: Annotated[Optional[str], typer.Option(help="The concept: comma-separated single-token words (default: the toy world's colours).")] = None,
    k: Annotated[int, typer.Option(min=1, help="SOMP steps: concept atoms per head (at most the number of words).")] = 3,
    positions: Annotated[str, typer.Option(help="Average each head's write over the image tokens, or the answer (description) tokens.")] = "image",
    limit: Annotated[Optional[int], typer.Option(min=2, help="Use only the first N samples.")] = None,
    batch_size: BatchSizeOpt = 4,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    split: TraceSplitOpt = "auto",
    top: Annotated[int, typer.Option(min=1, help="Show the K heads whose writes the concept explains best.")] = 10,
    as_json: JsonOpt = False,
) -> None:
    """Head Pursuit (Basile et al. 2025): heads ranked by how much of their residual-stream
    write a few of the concept words' unembedding directions explain (SOMP)."""
    from mechhi.trace.pursuit_job import PursuitConfig, run_pursuit
    from probes.head_pursuit import head_ranking

    defaults = PursuitConfig()
    config = PursuitConfig(
        model=model or defaults.model, dataset=str(dataset) if dataset else defaults.dataset,
        words=tuple(w.strip() for w in words.split(",") if w.strip()) if words else defaults.words, k=k, positions=positions, limit=limit,
        batch_size=batch_size, device=device, dtype=dtype, split=split,
    )  # fmt: skip
    result = run_pursuit(config, progress=True)  # the bar is on stderr: --json stays clean
    ranking = head_ranking(result)
    rows = []
    for i in range(ranking.sizes["unit"]):
        layer, head = int(ranking["layer"][i]), int(ranking["head"][i])
        at = result.sel(layer=layer, head=head)
        rows.append({"rank": i + 1, "layer": layer, "head": head, "explained": _finite(at.explained),
                     "explained_random": _finite(at.explained_random), "top_word": str(at.top_word.values)})  # fmt: skip
    if as_json:
        print_json({"model": config.model, "dataset": config.dataset, "words": list(config.words), "k": config.k,
                    "positions": config.positions, "samples": result.attrs["samples"], "heads": rows[:top]})  # fmt: skip
        return
    table = Table(title=f"Head Pursuit of {', '.join(config.words)} (k={config.k}, {config.positions} tokens)")
    for column in ("rank", "layer", "head", "explained variance", "by random atoms", "top word"):
        table.add_column(column, justify="right")
    for row in rows[:top]:
        shown = ["n/a" if row[key] is None else f"{row[key]:.3f}" for key in ("explained", "explained_random")]
        table.add_row(str(row["rank"]), str(row["layer"]), str(row["head"]), *shown, row["top_word"])
    console.print(table)
    console.print("by random atoms: the same pursuit on as many random directions, the chance reference.")


@app.command()
@friendly_errors
def stats(
    store: StoreOpt, mask_threshold: MaskThresholdOpt = 0.5, keep_best: KeepBestOpt = True, as_json: JsonOpt = False
) -> None:
    """Kruskal-Wallis tests of Head Impact across layers and across heads."""
    from probes.head_impact import kruskal_records, kruskal_wallis

    ds = scored(store, mask_threshold, keep_best)
    tests = kruskal_records(kruskal_wallis(ds))
    if as_json:
        print_json({"store": str(store), "model": ds.attrs.get("model"), "kruskal_wallis": tests})
        return
    table = Table(title="Kruskal-Wallis")
    for column in ("across", "on", "statistic", "df", "p-value"):
        table.add_column(column, justify="right")
    for t in tests:
        statistic, p = t["statistic"], t["p_value"]
        shown_p = "n/a" if p is None else (f"[bold green]{p:.3g}[/]" if p < 0.001 else f"{p:.3g}")
        if p == 0.0:
            shown_p = "[bold green]< 1e-300[/]"  # below float range, not zero
        shown_stat = "n/a" if statistic is None else f"{statistic:.2f}"
        table.add_row(t["across"], t["on"], shown_stat, str(t["df"]), shown_p)
    console.print(table)
    console.print("p < 0.001 in green. n/a: fewer than two non-empty groups or all values equal.")


