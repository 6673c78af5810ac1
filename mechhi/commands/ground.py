"""`mechhi ground`: training-free grounding from a few heads' attention maps (Kang et al. 2025)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from mechhi.commands.app import app
from mechhi.commands.common import (
    JsonOpt,
    KeepBestOpt,
    MaskThresholdOpt,
    StoreOpt,
    console,
    friendly_errors,
    open_traced,
    print_json,
)


@app.command()
@friendly_errors
def ground(
    store: StoreOpt,
    by: Annotated[
        str,
        typer.Option(
            help="Whose top heads ground, comma-separated: spatial-entropy (Kang et al.'s "
            "localization heads), head-impact, attention-mass."
        ),
    ] = "spatial-entropy,head-impact",
    n_heads: Annotated[
        int | None,
        typer.Option(
            min=1, help="Heads per probe (default: as many as spatial entropy chooses at its elbow)."
        ),
    ] = None,
    smooth: Annotated[
        float, typer.Option(help="Gaussian smoothing of the summed map, in tokens (0: none).")
    ] = 0.0,
    per_sample_k: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="spatial-entropy: heads selected per sample "
            "(default: 10, at most a quarter of the candidates).",
        ),
    ] = None,
    mask_threshold: MaskThresholdOpt = 0.5,
    keep_best: KeepBestOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """Ground each sample's object from the summed maps of a few heads: the largest region above
    the mean, its box (and tokens) against the object's; IoU and accuracy at IoU >= 0.5."""
    from mechhi.scoring.grounding import ground_store

    ds = open_traced(store)
    probes = tuple(b.strip() for b in by.split(",") if b.strip())
    result = ground_store(
        ds,
        probes,
        n_heads=n_heads,
        smooth=smooth,
        per_sample_k=per_sample_k,
        mask_threshold=mask_threshold,
        keep_best=keep_best,
    )
    if as_json:
        print_json({"store": str(store), **result})
        return
    table = Table(
        title=f"Grounding by {result['n_heads']} heads per probe, {result['samples_done']} samples"
        f"{f', smoothed {smooth:g} tokens' if smooth else ''}: {result['store_model']}"
    )
    table.add_column("heads by", no_wrap=True)
    for column in ("box acc@0.5", "box IoU", "mask acc@0.5", "mask IoU", "samples"):
        table.add_column(column, justify="right")
    number = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    for g in [*result["groundings"], {"by": "(whole image)", **result["whole_image"]}]:
        table.add_row(
            g["by"],
            number(g["box_accuracy"]),
            number(g["box_iou_mean"]),
            number(g["mask_accuracy"]),
            number(g["mask_iou_mean"]),
            str(g["box_samples"]),
        )
    console.print(table)
    for g in result["groundings"]:
        console.print(f"{g['by']} heads: {' '.join(f'{l}:{h}' for l, h in g['heads'])}")
    for o in result["overlap"]:
        console.print(f"{o['by']} and {o['other']} share {o['shared']} of {result['n_heads']} heads.")
    console.print(
        "box / mask: the largest region above the summed map's mean against the object's box / tokens "
        "(coverage >= the mask threshold), in token cells; whole image: the grid as the region."
    )
