"""`mechhi trace`: the trace stage's command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mechhi.commands.app import app
from mechhi.commands.common import (
    BatchSizeOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    ToyDatasetOpt,
    ToyModelOpt,
    TraceSplitOpt,
    console,
    err_console,
    friendly_errors,
)


@app.command()
@friendly_errors
def trace(
    model: ToyModelOpt = None,
    dataset: ToyDatasetOpt = None,
    store: Annotated[
        Path | None,
        typer.Option(
            help="Output store (default: stores/<model>__<dataset>.zarr, "
            "__<template> added for another template than caption; "
            "stores/toy.zarr for the bundled model and set)."
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Trace only the first N samples.")] = None,
    batch_size: BatchSizeOpt = 4,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    num_workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Processes that decode images, carry masks and run "
            "the processor while the model runs (default: up "
            "to 4 with the model on a GPU; on a CPU 0, in "
            "process, below 8 cores).",
        ),
    ] = None,
    no_maps: Annotated[
        bool, typer.Option("--no-maps", help="Keep masks and IoU only, not the attention cube.")
    ] = False,
    template: Annotated[
        str,
        typer.Option(
            help="Prompt template: caption, or vqa (the closed-ended question "
            "with options A-D drawn as in `mechhi evaluate`)."
        ),
    ] = "caption",
    split: TraceSplitOpt = "auto",
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Skip invalid records (listed in the store attrs).")
    ] = False,
    max_description_tokens: Annotated[
        int,
        typer.Option(
            min=1, help="Longer descriptions are invalid records (each token is a traced query row)."
        ),
    ] = 128,
    shard_samples: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Samples per store shard file (default: a power "
            "of two, at most 32 MiB and 256 samples); a new "
            "store only.",
        ),
    ] = None,
) -> None:
    """Trace description-to-image attention of every head into a zarr store, then score it.

    Rerunning the same command resumes an interrupted trace, and does nothing on a
    finished one. Under torchrun (`torchrun --nproc-per-node N -m mechhi trace ...`) each
    rank traces its own shards of the store and rank 0 scores and prints the result."""
    from mechhi.trace import distributed
    from mechhi.trace.trace_dataset import TraceConfig, trace_dataset
    from probes.head_impact import ensure_scored, layer_ranking

    defaults = TraceConfig()
    config = TraceConfig(
        model=model or defaults.model,
        dataset=str(dataset) if dataset else defaults.dataset,
        store=str(store) if store else None,
        limit=limit,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        maps=not no_maps,
        template=template,
        split=split,
        skip_bad=skip_bad,
        max_description_tokens=max_description_tokens,
        device_map=device_map,
        num_workers=num_workers,
        shard_samples=shard_samples,
    )
    with distributed.session() as ranks:
        path = trace_dataset(config, progress=True, ranks=ranks)
    if not ranks.main:
        return
    result = ensure_scored(path)
    if result.note:
        err_console.print(result.note, highlight=False)
    ranking = layer_ranking(result.ds)
    console.print(
        f"store: [bold]{path}[/]  samples: {result.ds.sizes['sample']}  "
        f"best layer: {int(ranking.layer[0])} (mean HI {float(ranking[0]):.3f})"
    )
