"""`mechhi bench`: the capture against the plain forward and against eager output_attentions."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from mechhi.commands.app import app
from mechhi.commands.common import DeviceOpt, DtypeOpt, JsonOpt, friendly_errors, print_json


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


@app.command()
@friendly_errors
def bench(
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="2 layers, 256 and 1024 visual tokens, 2 rounds (minutes on 2 CPU cores)."
        ),
    ] = False,
    configs: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated: qwen2-vl-2b, paligemma2-3b, smolvlm (the default: these three), "
            "smollm2-llava (the zoo model's SmolLM2-135M)."
        ),
    ] = None,
    tokens: Annotated[
        str | None,
        typer.Option(help="Visual tokens per sample, comma-separated (default 256,1024,4096,8192)."),
    ] = None,
    layers: Annotated[
        int | None, typer.Option(min=2, help="Decoder layers (default: each checkpoint's depth).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Samples per forward in the size sweep.")] = 1,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    rounds: Annotated[
        int | None, typer.Option(min=1, help="Timed rounds after the warm-up (default 3, --quick 2).")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="Threads per process (default 1 on CPU).")
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option(min=1, help="Processes at once (default: cores / threads on CPU, 1 on CUDA)."),
    ] = None,
    no_eager: Annotated[bool, typer.Option("--no-eager", help="Skip eager output_attentions.")] = False,
    no_timing: Annotated[
        bool, typer.Option("--no-timing", help="Peak memory only: one run per mode and size.")
    ] = False,
    no_overhead: Annotated[
        bool, typer.Option("--no-overhead", help="Skip the nnsight per-trace overhead measurement.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Floor (plain forward) vs mechhi's capture vs eager output_attentions: time and peak memory."""
    from dataclasses import replace

    from mechhi.bench import QUICK, BenchOptions, report_text, run, targets

    options = BenchOptions(**QUICK) if quick else BenchOptions()
    chosen = {
        "configs": tuple(c.strip() for c in configs.split(",") if c.strip()) if configs else None,
        "targets": _ints(tokens) if tokens else None,
        "layers": layers,
        "rounds": rounds,
        "threads": threads,
        "jobs": jobs,
    }
    options = replace(
        options,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        eager=not no_eager,
        timing=not no_timing,
        overhead=not no_overhead,
        **{k: v for k, v in chosen.items() if v is not None},
    )
    report = run.bench(options)
    if as_json:
        print_json({**report.to_json(), "targets": targets(report)})
    else:
        sys.stdout.write(report_text(report) + "\n")
