"""The information-flow commands: `mechhi knockout` and `mechhi patch`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mechhi.commands.app import app
from mechhi.commands.common import (
    BatchSizeOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    console,
    err_console,
    friendly_errors,
    print_json,
)
from mechhi.commands.intervene import (
    DefaultStoreOpt,
    EvalDatasetOpt,
    EvalSplitOpt,
    StoreModelOpt,
    ThreadsOpt,
    _threads,
    _value,
    _words,
)


def _ints(text: str | None, option: str) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{option} {text!r}: give comma-separated integers, e.g. 0,2") from None


@app.command()
@friendly_errors
def knockout(
    store: DefaultStoreOpt = None,
    pairs: Annotated[
        str | None,
        typer.Option(
            help="Flows to cut, comma-separated source->target token groups "
            "(description, last, question, image, object, background, "
            "image:<view>); default: image->last, question->last, "
            "image->question, object->last, background->last, "
            "image->description."
        ),
    ] = None,
    window: Annotated[
        int | None, typer.Option(min=1, help="Layers per window (default: a sixth of the depth).")
    ] = None,
    stride: Annotated[
        int | None, typer.Option(min=1, help="Layers between window starts (default: the window).")
    ] = None,
    heads: Annotated[
        str | None, typer.Option(help="Only these heads of each window's layers, e.g. 0,2 (default: all).")
    ] = None,
    dataset: EvalDatasetOpt = None,
    split: EvalSplitOpt = "test",
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluation samples.")] = 50,
    out: Annotated[Path, typer.Option(help="Cache of finished windows and knockout.json.")] = Path(
        "experiments/knockout"
    ),
    figure: Annotated[
        Path | None, typer.Option(help="Also draw window x effect per flow to this PNG/SVG/PDF.")
    ] = None,
    model: StoreModelOpt = None,
    batch_size: BatchSizeOpt = 16,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Cut attention edges between token groups, window by window: where does the image reach the answer?

    Each row is one flow source->target (the target's tokens may not attend the source's) in
    one window of layers, all heads (or --heads); the change of the description's
    log-probability and of the four-option VQA accuracy against the intact model, ± paired SE.
    """
    from mechhi.flow.knockout_job import DEFAULT_PAIRS, KnockoutConfig, run_knockout

    _threads(threads)
    config = KnockoutConfig(
        store=str(store) if store else None,
        pairs=_words(pairs) or DEFAULT_PAIRS,
        window=window,
        stride=stride,
        heads=_ints(heads, "--heads"),
        dataset=str(dataset) if dataset else None,
        split=split,
        limit=limit,
        out=str(out),
        model=model,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
    )
    report = run_knockout(config, progress=not as_json)
    if figure is not None:
        from mechhi.figures.flow import knockout_figure
        from mechhi.figures.style import save

        save(knockout_figure(report), figure)
        err_console.print(f"figure: {figure}")
    if as_json:
        print_json(report)
        return
    print_knockout(report)


def print_knockout(report: dict[str, Any]) -> None:
    metrics = {
        "answer_logprob": "description log-prob",
        "vqa_accuracy": "VQA accuracy",
        "ans_prob": "AnsProb",
    }
    table = Table(title=f"Attention knockout, {report['n_samples']} samples: {report['model']}")
    for column in ("flow", "layers", *metrics.values()):
        table.add_column(column, justify="right")
    table.add_row("intact", "-", *(_value(report["intact"][m], signed=False) for m in metrics))
    for row in report["rows"]:
        first, last = row["window"]
        table.add_row(row["pair"], f"{first}-{last}", *(_value(row["change"][m]) for m in metrics))
    console.print(table)
    console.print("intact: value ± SE; other rows: change against it ± paired SE.")


@app.command()
@friendly_errors
def patch(
    store: DefaultStoreOpt = None,
    method: Annotated[
        str,
        typer.Option(
            help="exact: patch each site in its own run; attribution: the gradient "
            "estimate of every head at once; both: the two and their agreement."
        ),
    ] = "exact",
    change: Annotated[
        str,
        typer.Option(
            help="The corruption: colour, shape or remove the object (toy-world data, "
            "exact counterfactuals); noise or blur over its mask (any data)."
        ),
    ] = "colour",
    sites: Annotated[
        str, typer.Option(help="heads (o_proj input slices) or residual (a layer's output at a token group).")
    ] = "heads",
    positions: Annotated[
        str, typer.Option(help="Heads only: patch at every position (all) or at one token group's.")
    ] = "all",
    groups: Annotated[
        str | None, typer.Option(help="Residual only: the token groups patched, comma-separated.")
    ] = None,
    dataset: EvalDatasetOpt = None,
    split: EvalSplitOpt = "test",
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluation samples.")] = 20,
    seed: Annotated[int, typer.Option(help="Seed of the noise (--change noise).")] = 0,
    top: Annotated[int, typer.Option(min=1, help="Sites shown.")] = 10,
    out: Annotated[
        Path | None, typer.Option(help="Cache and results (default: <store>.patch beside the store).")
    ] = None,
    model: StoreModelOpt = None,
    batch_size: BatchSizeOpt = 16,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Patch activations from a clean image into a corrupted one: which heads carry the object?

    The effect of a site is how much of the clean answer it restores, mean(patched -
    corrupted) / mean(clean - corrupted): 0 = corrupted, 1 = clean; the metric is the logit
    difference of the clean and the counterfactual word (or the description's log-probability).
    """
    from mechhi.flow.patch_job import RESIDUAL_GROUPS, PatchConfig, run_patch

    _threads(threads)
    config = PatchConfig(
        store=str(store) if store else None,
        method=method,
        change=change,
        sites=sites,
        positions=positions,
        groups=_words(groups) or RESIDUAL_GROUPS,
        dataset=str(dataset) if dataset else None,
        split=split,
        limit=limit,
        seed=seed,
        batch_size=batch_size,
        out=str(out) if out else None,
        model=model,
        device=device,
        dtype=dtype,
    )
    report = run_patch(config, progress=not as_json, top=top)
    if as_json:
        print_json(report)
        return
    print_patch(report)


def print_patch(report: dict[str, Any]) -> None:
    for method in report["methods"]:
        result = report["results"][method]
        cells = [d for d in ("layer", "head", "group") if d in result["top"][0]]
        table = Table(
            title=f"Patching ({method}), change {report['change']}, {report['n_samples']} samples: "
            f"{report['model']}"
        )
        for column in (*cells, "effect"):
            table.add_column(column, justify="right")
        for row in result["top"]:
            table.add_row(*(str(row[c]) for c in cells), f"{row['effect']:+.3f}")
        console.print(table)
        console.print(f"results: {result['path']}  (mean clean - corrupted metric {result['gap']:.3g})")
    if "agreement" in report:
        a = report["agreement"]
        console.print(
            f"attribution vs exact over {a['n_sites']} sites: Spearman {a['spearman']:+.3f} (p {a['p']:.2g})"
        )
    for line in report["skipped"]:
        console.print(f"skipped: {line}")
