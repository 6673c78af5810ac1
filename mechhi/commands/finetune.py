"""The fine-tuning stage's commands: `mechhi finetune`, `mechhi evaluate`, `mechhi experiment`.

Each runs its engine function with stdout pointed at stderr (`_result_only`), so a
progress bar or a library's print can never get in front of the result; then it prints
the result alone: a table, or JSON with ``--json``.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mechhi.commands.app import app
from mechhi.commands.common import (
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    console,
    err_console,
    friendly_errors,
    print_json,
)


@contextlib.contextmanager
def _result_only() -> Iterator[None]:
    """While the engine runs, anything written to stdout goes to stderr."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


@app.command()
@friendly_errors
def finetune(
    store: Annotated[
        Path | None, typer.Option(help="Scored store whose Head Impact ranking picks the layers.")
    ] = Path("stores/toy.zarr"),
    select: Annotated[
        str, typer.Option(help="top-K | bottom-K | random-K | depth-K | full | layers=3,7")
    ] = "top-4",
    out: Annotated[
        Path | None, typer.Option(help="Adapter directory (default: adapters/<store>-<select>).")
    ] = None,
    dataset: Annotated[
        Path | None, typer.Option(help="Dataset with train/val splits (default: toy fine-tuning set).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Base model (default: the store's model).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random-K / depth-K draw.")] = 0,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps.")] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Samples per forward pass, per process.")
    ] = None,
    grad_accum: Annotated[int | None, typer.Option(min=1, help="Forward passes per optimizer step.")] = None,
    mixed_precision: Annotated[
        str, typer.Option(help="auto (bf16 on a CUDA GPU that has it) | no | bf16 | fp16")
    ] = "auto",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Train LoRA (r=8, alpha=16, q/k/v) on the decoder layers chosen from the store's ranking.

    Runs in one process, or in several under \
`accelerate launch --multi_gpu --num_processes N -m mechhi finetune ...`
    (each process takes --batch-size samples per forward pass).
    """
    from dataclasses import replace

    from mechhi.finetune import FinetuneConfig, TrainSettings
    from mechhi.finetune import finetune as run_finetune

    given = {"max_steps": max_steps, "batch_size": batch_size, "grad_accum": grad_accum}
    train = replace(TrainSettings(), mixed_precision=mixed_precision, **{k: v for k, v in given.items() if v})
    config = FinetuneConfig(
        store=str(store) if store else None,
        select=select,
        out=str(out) if out else None,
        dataset=str(dataset) if dataset else None,
        model=model,
        select_seed=seed,
        device=device,
        dtype=dtype,
        train=train,
    )
    with _result_only():
        result = run_finetune(config)
    if not _is_main_process():
        return
    summary = result.summary()
    if result.resumed_finished:
        err_console.print(f"{summary['out']} already holds this finished run: nothing to do")
    if as_json:
        print_json(summary)
    else:
        print_finetune(summary)


def print_finetune(summary: dict) -> None:
    """The trained adapter in one table row, with Table 5's parameter columns."""
    params = summary["params"]
    table = Table(title="Fine-tuned LoRA adapter")
    for name in ("adapter", "layers", "best val loss", "at step", "total, #", "trainable, #", "trainable, %"):
        table.add_column(name, justify="left" if name == "adapter" else "right")
    best = summary["best_val_loss"]
    shown_best = "n/a" if best is None or not math.isfinite(best) else f"{best:.4f}"
    counts = (f"{int(params['total']):,}", f"{int(params['trainable']):,}", f"{params['trainable_pct']:.4f}")
    table.add_row(
        summary["out"],
        ",".join(map(str, summary["layers"])) or "-",
        shown_best,
        str(summary["best_step"]),
        *counts,
    )
    console.print(table)
    if summary.get("stopped_early"):
        console.print("stopped early: the validation loss stopped improving")


def _is_main_process() -> bool:
    """Under `accelerate launch` only the main process prints the result."""
    from accelerate import PartialState

    return PartialState().is_main_process


@app.command()
@friendly_errors
def evaluate(
    model: Annotated[
        str | None, typer.Option(help="Base model (default: the adapter's base, else the toy).")
    ] = None,
    adapter: Annotated[
        Path | None, typer.Option(help="LoRA adapter directory from `mechhi finetune`.")
    ] = None,
    dataset: Annotated[Path | None, typer.Option(help="Dataset (default: toy fine-tuning set).")] = None,
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate at most N samples.")] = 200,
    force: Annotated[
        bool, typer.Option(help="Evaluate the adapter on a base model other than its own.")
    ] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity over answer tokens, closed-ended VQA accuracy and AnsProb, with standard errors."""
    from dataclasses import replace

    from mechhi.evaluate.evaluate_run import EvalSettings, EvaluateConfig, run_evaluate

    config = EvaluateConfig(
        model=model,
        adapter=str(adapter) if adapter else None,
        dataset=str(dataset) if dataset else None,
        split=split,
        device=device,
        dtype=dtype,
        device_map=device_map,
        force=force,
        eval=replace(EvalSettings(), limit=limit),
    )
    with _result_only():
        result = run_evaluate(config)
    if "warning" in result:
        err_console.print(f"[yellow]warning[/]: {result['warning']}", highlight=False)
    if as_json:
        print_json(result)
        return
    table = Table(title=f"evaluation on {split}")
    table.add_column("metric")
    table.add_column("mean ± SE", justify="right")
    for name, metric in result.get("metrics", {}).items():
        if isinstance(metric, dict) and "mean" in metric:
            table.add_row(name, f"{metric['mean']:.4f} ± {metric['se']:.4f}")
    console.print(table)
    for line in result.get("metrics", {}).get("generations", [])[:5]:
        console.print(f"  {line}")


@app.command()
@friendly_errors
def experiment(
    model: Annotated[str | None, typer.Option(help="Base model (default: the store's model).")] = None,
    store: Annotated[Path, typer.Option(help="Scored store whose ranking picks the layers.")] = Path(
        "stores/toy.zarr"
    ),
    dataset: Annotated[
        Path | None, typer.Option(help="Dataset with train/val/test (default: toy set).")
    ] = None,
    k: Annotated[int, typer.Option(min=1, help="Layers per setup (top-K, bottom-K, random-K, depth-K).")] = 3,
    seeds: Annotated[int, typer.Option(min=1, help="Random-K and depth-K draws (mean and spread).")] = 3,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps per setup.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate at most N test samples.")] = 200,
    out: Annotated[Path, typer.Option(help="Results directory.")] = Path("experiments/toy"),
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """The paper's comparison: original / top-K / bottom-K / random-K / depth-K / full (Tables 4 and 5)."""
    from dataclasses import replace

    from mechhi.evaluate.experiment import ExperimentConfig, run_experiment
    from mechhi.evaluate.prepared import EvalSettings
    from mechhi.evaluate.tables import print_report
    from mechhi.finetune import TrainSettings

    train = replace(TrainSettings(), **({"max_steps": max_steps} if max_steps else {}))
    config = ExperimentConfig(
        store=str(store),
        model=model,
        dataset=str(dataset) if dataset else None,
        out=str(out),
        k=k,
        random_seeds=tuple(range(seeds)),
        device=device,
        dtype=dtype,
        train=train,
        eval=replace(EvalSettings(), limit=limit),
    )
    with _result_only():
        report = run_experiment(config)
    if not _is_main_process():
        return
    err_console.print(f"results: {out}/results.json, table4.csv, table5.csv, audit.csv")
    if as_json:
        print_json(report)
    else:
        print_report(report, console)
