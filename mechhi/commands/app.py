"""The typer apps: ``mechhi`` and its ``dataset``, ``toy`` and ``zoo`` groups. Commands register
themselves on them from their stage's module."""

from __future__ import annotations

import typer

from mechhi.commands.common import OneLineErrors

app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    help="Find the attention heads of a vision-language model that look at key objects; fine-tune by them.",
)
dataset_app = typer.Typer(no_args_is_help=True, help="Build, inspect and validate key-object datasets.")
toy_app = typer.Typer(no_args_is_help=True, help="The bundled toy world: train and check the small model.")
app.add_typer(dataset_app, name="dataset")
zoo_app = typer.Typer(no_args_is_help=True, help="Pretrained models assembled offline: build and list them.")
app.add_typer(toy_app, name="toy")
app.add_typer(zoo_app, name="zoo")
