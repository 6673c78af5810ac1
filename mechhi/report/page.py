"""Assemble the sections into the page and write it as ``<out>/index.html``."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Sequence
from pathlib import Path

from mechhi.figures.style import PlotError, dataset_name, sample_count
from mechhi.report.html import Section, join, page, paragraph
from mechhi.report.sections import SECTIONS, ReportInput

PAGE_NAME = "index.html"


def _title(report: ReportInput) -> tuple[str, str]:
    labels = ", ".join(e.label for e in report.stores)
    parts = [f"{sample_count(e.ds)} samples of {dataset_name(e.ds.attrs)}" for e in report.stores]
    version = report.stores[0].ds.attrs.get("mechhi_version", "?")
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"mechhi report: {labels}", f"{'; '.join(parts)} · mechhi {version} · written {when}"


def build_report(
    report: ReportInput,
    out: str | Path,
    sections: Sequence[Callable[[ReportInput], Section | None]] = SECTIONS,
) -> Path:
    """Build every section and write the page; returns its path."""
    if not report.stores:
        raise PlotError("report: no stores given")
    built = [s for s in (build(report) for build in sections) if s is not None]
    if report.notes:
        built.append(Section("notes", "Notes", join(paragraph(n, "note") for n in report.notes)))
    path = Path(out) / PAGE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page(*_title(report), built), encoding="utf-8")
    return path
