"""What the report is built from, and the one layout helper every per-store section uses.

Kept apart from the sections so that the section modules (`sections`, `statistics`,
`causal`) can share it without importing each other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xarray as xr
from markupsafe import Markup

from mechhi.report.html import heading, join, render


@dataclass(frozen=True)
class StoreEntry:
    """One scored store of the report: its label, where it was read from, the dataset."""

    label: str
    path: Path
    ds: xr.Dataset


@dataclass(frozen=True)
class ReportInput:
    stores: Sequence[StoreEntry]
    experiment: Path | None = None  # a `mechhi experiment` out dir (results.json) or the file
    pursuit: Mapping[str, Any] | None = None  # `mechhi pursuit --json` output
    ablate: Path | None = None  # a `mechhi ablate` out dir (ablate.json) or the file
    edit: Path | None = None  # a `mechhi edit` out dir (edit.json) or the file
    agreement: Sequence[
        tuple[Path, Mapping[str, Any]]
    ] = ()  # (file, `mechhi rank --compare-probes --json` output)
    top_k: int = 3  # the bootstrap's top-K shares
    n_resamples: int = 2000  # bootstrap resamples
    gallery_samples: int = 6
    gallery_heads: int = 4
    notes: list[str] = field(default_factory=list)  # what a section could not show, for the page's end


def per_store(report: ReportInput, build: Callable[[int, StoreEntry], Markup]) -> Markup:
    """Each store's part, side by side under its label (no label when there is one store)."""
    if len(report.stores) == 1:
        return build(0, report.stores[0])
    blocks = (
        render("<div>{{ h }}{{ b }}</div>", h=heading(e.label), b=build(i, e))
        for i, e in enumerate(report.stores)
    )
    return render("<div class='columns'>{{ blocks }}</div>", blocks=join(blocks))
