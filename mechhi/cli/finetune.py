"""The fine-tuning stage's commands: `mechhi finetune`, `mechhi evaluate`, `mechhi experiment`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .app import app
from .common import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    console,
    friendly_errors,
    print_json,
)  # fmt: skip


@app.command()
@friendly_errors
def finetune(
    store: Annotated[Optional[Path], typer.Option(help="Scored store whose Head Impact ranking picks the layers.")] = Path("stores/toy.zarr"),
    select: Annotated[str, typer.Option(help="top-K | bottom-K | random-K | full | layers=3,7")] = "top-4",
    out: Annotated[Optional[Path], typer.Option(help="Adapter directory (default: adapters/<store>-<select>).")] = None,
    dataset: Annotated[Optional[Path], typer.Option(help="Dataset with train/val splits (default: toy fine-tuning set).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Base model (default: the store's model).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random-K draw.")] = 0,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="Optimizer steps.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Train LoRA (r=8, alpha=16, q/k/v) on the decoder layers chosen from the store's ranking."""
    from dataclasses import replace

    from mechhi.finetune import FinetuneConfig, TrainSettings
    from mechhi.finetune import finetune as run_finetune

    train = replace(TrainSettings(), **({"max_steps": max_steps} if max_steps else {}))
    config = FinetuneConfig(store=str(store) if store else None, select=select, out=str(out) if out else None,
                            dataset=str(dataset) if dataset else None, model=model, select_seed=seed,
                            device=device, dtype=dtype, train=train)  # fmt: skip
    summary = run_finetune(config).summary()
    if as_json:
        print_json(summary)
    else:
        console.print(f"adapter: [bold]{summary['out']}[/]  layers {summary['layers']}  "
                      f"best val loss {summary['best_val_loss']:.4f} at step {summary['best_step']}  "
                      f"trainable {summary['params']}")  # fmt: skip


@app.command()
@friendly_errors
def evaluate(
    model: Annotated[Optional[str], typer.Option(help="Base model (default: the adapter's base, else the toy).")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="LoRA adapter directory from `mechhi finetune`.")] = None,
    dataset: Annotated[Optional[Path], typer.Option(help="Dataset (default: toy fine-tuning set).")] = None,
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    limit: Annotated[Optional[int], typer.Option(min=1, help="Evaluate at most N samples.")] = 200,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Perplexity over answer tokens, closed-ended VQA accuracy and AnsProb, with standard errors."""
    from dataclasses import replace

    from mechhi.evaluate.job import EvalSettings, EvaluateConfig, run_evaluate

    config = EvaluateConfig(model=model, adapter=str(adapter) if adapter else None,
                            dataset=str(dataset) if dataset else None, split=split, device=device, dtype=dtype,
                            eval=replace(EvalSettings(), limit=limit))  # fmt: skip
    result = run_evaluate(config)
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
    model: Annotated[Optional[str], typer.Option(help="Base model (default: the store's model).")] = None,
    store: Annotated[Path, typer.Option(help="Scored store whose ranking picks the layers.")] = Path("stores/toy.zarr"),
    dataset: Annotated[Optional[Path], typer.Option(help="Dataset with train/val/test (default: toy set).")] = None,
    k: Annotated[int, typer.Option(min=1, help="Layers per setup (top-K, bottom-K, random-K).")] = 3,
    seeds: Annotated[int, typer.Option(min=1, help="Random-K draws (mean and spread).")] = 3,
    out: Annotated[Path, typer.Option(help="Results directory.")] = Path("experiments/toy"),
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """The paper's comparison: original / top-K / bottom-K / random-K / full (Tables 4 and 5)."""
    from mechhi.evaluate.experiment import ExperimentConfig, run_experiment

    config = ExperimentConfig(store=str(store), model=model, dataset=str(dataset) if dataset else None,
                              out=str(out), k=k, random_seeds=tuple(range(seeds)), device=device,
                              dtype=dtype)  # fmt: skip
    run_experiment(config)
    console.print(f"results: {out}/results.json, table4.csv, table5.csv, audit.csv")

