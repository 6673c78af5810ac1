"""`mechhi plot`: figures of stores."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import app
from .common import (
    console,
    friendly_errors,
    scored,
)  # fmt: skip


@app.command()
@friendly_errors
def plot(
    kind: Annotated[str, typer.Argument(help="heatmap | layers | overlay | compare")],
    store: Annotated[list[Path], typer.Option("--store", "-s", help="Store(s); compare takes several.")],
    out: Annotated[Path, typer.Option(help="Output PNG.")],
    sample: Annotated[int, typer.Option(help="overlay: sample index.")] = 0,
    layer: Annotated[Optional[int], typer.Option(help="overlay: layer (default: the best by mean HI).")] = None,
    head: Annotated[Optional[int], typer.Option(help="overlay: head (default: the best in that layer).")] = None,
) -> None:
    """Figures: HI heatmap, HI by layer, one head's map over its image, models compared by depth."""
    from mechhi import plots
    from mechhi.store import open_store

    stores = [open_store(s) for s in store]
    if kind != "compare" and len(stores) != 1:
        raise ValueError(f"plot {kind} takes one --store")
    if kind == "heatmap":
        path = plots.plot_heatmap(stores[0], out)
    elif kind == "layers":
        path = plots.plot_layers(stores[0], out)
    elif kind == "overlay":
        from probes.head_impact import layer_ranking

        ds = stores[0] if "head_impact" in stores[0] else scored(store[0])  # an unscored store: score it as `rank` would
        layer = int(layer_ranking(ds).layer[0]) if layer is None else layer
        head = int(ds.head_impact.sel(layer=layer).idxmax()) if head is None else head
        path = plots.plot_overlay(ds, out, sample=sample, layer=layer, head=head)
    elif kind == "compare":
        path = plots.plot_compare(stores, out)
    else:
        raise ValueError(f"unknown plot {kind!r}; choose heatmap, layers, overlay or compare")
    console.print(f"figure written to {path}")

