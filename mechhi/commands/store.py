"""`mechhi store verify`: find done samples whose data is lost or corrupt."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mechhi.commands.app import app
from mechhi.commands.common import JsonOpt, console, friendly_errors, print_json

store_app = typer.Typer(no_args_is_help=True, help="Check mechhi stores.")
app.add_typer(store_app, name="store")


@store_app.command("verify")
@friendly_errors
def store_verify(
    store: Annotated[Path, typer.Argument(help="Path of a mechhi zarr store.")],
    deep: Annotated[
        bool,
        typer.Option(
            "--deep",
            help="Also decode every done sample's chunks (finds "
            "flipped bytes by their checksums; reads the whole store).",
        ),
    ] = False,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Mark the damaged samples not done (deleting a "
            "damaged shard or done file: its samples too), so the next "
            "`mechhi trace` traces them again.",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """List done samples whose traced data is missing or damaged (or, with --deep, does not
    decode: a checksum mismatch); exit 1 if there are any and --repair was not given.

    Without --deep only file sizes, the done flags and each shard file's index are read:
    deleted or truncated shards, inner chunks missing from their shard and damaged done
    files. --deep decodes every done sample's chunks, checking each one's crc32c."""
    from mechhi.store import WriterLock, damaged_samples, done_flags, open_store, unchecked, unflagged
    from mechhi.store.verify import repair as make_pending
    from mechhi.store.verify import samples_text

    ds = open_store(store, check_done=False)  # damaged done files are findings here, not errors
    damage = damaged_samples(store, deep=deep)
    pending = unflagged(store)
    plain = unchecked(store)
    samples = sorted({d.sample for d in damage})
    if repair and samples:
        with WriterLock(store):
            samples = make_pending(store, damage)
    done = int(done_flags(store)[0].sum())
    if as_json:
        print_json(
            {
                "store": str(store),
                "samples": ds.sizes["sample"],
                "done": done,
                "deep": deep,
                "damaged": [
                    {
                        "sample": d.sample,
                        "variable": d.variable,
                        "file": d.file,
                        "kind": d.kind,
                        "problem": d.problem,
                    }
                    for d in damage
                ],
                "unflagged": [{"file": key, "samples": found} for key, found in pending],
                "unchecked": plain,
                "repaired": samples if repair else [],
            }
        )
    else:
        checked = (
            "every chunk decoded" if deep else "shard files and indexes checked; --deep decodes every chunk"
        )
        console.print(f"{store}: {ds.sizes['sample']} samples, {done} done ({checked})", highlight=False)
        for d in damage:
            console.print(f"[red]lost[/] {d.message}", highlight=False)
        for key, found in pending:
            console.print(
                f"[yellow]not flagged[/] {key} is missing, but {samples_text(found)} have traced "
                "data: they count as not done and the next `mechhi trace` traces them again",
                highlight=False,
            )
        if plain:
            console.print(
                f"[yellow]unchecked[/] the chunks of {', '.join(plain)} carry no checksum (a store "
                "written before mechhi checksummed chunks): flipped bytes in them cannot be found",
                highlight=False,
            )
        if not damage:
            console.print("[green]no lost data[/]")
        elif repair:
            console.print(
                f"{len(samples)} sample(s) marked not done: rerun the same `mechhi trace` to trace them again"
            )
        elif any(d.kind == "unreadable" for d in damage):
            console.print(
                f"[red]{len(samples)} damaged sample(s)[/]: run `mechhi store verify --deep "
                f"--repair {store}`, then rerun the same `mechhi trace`",
                highlight=False,
            )
        else:
            console.print(
                f"[red]{len(samples)} damaged sample(s)[/]: rerun the same `mechhi trace` "
                "(it repairs them and traces them again)"
            )
    if damage and not repair:
        raise typer.Exit(1)
