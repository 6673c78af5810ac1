"""`mechhi store verify`: find done samples whose data is lost."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import app
from .common import JsonOpt, console, friendly_errors, print_json

store_app = typer.Typer(no_args_is_help=True, help="Check mechhi stores.")
app.add_typer(store_app, name="store")


@store_app.command("verify")
@friendly_errors
def store_verify(
    store: Annotated[Path, typer.Argument(help="Path of a mechhi zarr store.")],
    deep: Annotated[bool, typer.Option("--deep", help="Also read every done sample's chunks (finds corrupt ones; "
                                                      "reads the whole store).")] = False,
    repair: Annotated[bool, typer.Option("--repair", help="Mark the damaged samples not done (deleting a "
                                                          "corrupt shard file: its samples too), so the next "
                                                          "`mechhi trace` traces them again.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List done samples whose traced data is missing (or, with --deep, unreadable); exit 1
    if there are any and --repair was not given."""
    from mechhi.store import WriterLock, damaged_samples, open_store
    from mechhi.store.verify import repair as make_pending

    ds = open_store(store)
    damage = damaged_samples(store, deep=deep)
    samples = sorted({d.sample for d in damage})
    if repair and samples:
        with WriterLock(store):
            samples = make_pending(store, damage)
    if as_json:
        print_json({"store": str(store), "samples": ds.sizes["sample"], "done": int(ds.done.sum()), "deep": deep,
                    "damaged": [{"sample": d.sample, "variable": d.variable, "problem": d.problem} for d in damage],
                    "repaired": samples if repair else []})  # fmt: skip
    else:
        console.print(f"{store}: {ds.sizes['sample']} samples, {int(ds.done.sum())} done"
                      f"{'' if deep else ' (chunk files checked; --deep reads them)'}")  # fmt: skip
        for d in damage:
            console.print(f"[red]lost[/] {d.message}", highlight=False)
        if not damage:
            console.print("[green]no lost data[/]")
        elif repair:
            console.print(f"{len(samples)} sample(s) marked not done: rerun the same `mechhi trace` to trace them again")
        else:
            console.print(f"[red]{len(samples)} damaged sample(s)[/]: rerun the same `mechhi trace` "
                          "(or --repair first for unreadable chunks)")  # fmt: skip
    if damage and not repair:
        raise typer.Exit(1)
