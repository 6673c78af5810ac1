"""`mechhi toy train | card`: the bundled toy world."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mechhi.commands.app import toy_app
from mechhi.commands.common import console, friendly_errors


@toy_app.command("train")
@friendly_errors
def toy_train(
    out: Annotated[
        Path | None, typer.Option(help="Output directory (default: mechhi/zoo/toy-qwen2vl).")
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            min=1, help="Language-phase steps (default 700; the vision phase adds 600 before them)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and data.")] = 0,
) -> None:
    """Train the toy Qwen2-VL on the synthetic world (2 CPU cores; resumes from its checkpoint)."""
    from dataclasses import replace

    from mechhi.models.toy import TOY_DIR, ToyConfig
    from mechhi.toyworld.train import train

    config = replace(ToyConfig(), seed=seed, **({"steps": steps} if steps else {}))
    console.print(f"model written to {train(config, out_dir=out or TOY_DIR)}")


@toy_app.command("card")
@friendly_errors
def toy_card(
    model_dir: Annotated[Path | None, typer.Option("--model", help="Trained toy model directory.")] = None,
    n_images: Annotated[int, typer.Option(min=10, help="Held-out scenes for the quality metrics.")] = 200,
) -> None:
    """Measure the toy model on held-out scenes and write its model card (README.md, metrics.json)."""
    from mechhi.models.toy import TOY_DIR
    from mechhi.toyworld.card import card_metrics, write_card

    directory = model_dir or TOY_DIR
    console.print(
        f"model card written to {write_card(card_metrics(directory, n_images=n_images), directory)}"
    )
