"""The report in a real browser (headless Chromium, tests/browser.py): the ranking table
has one row per layer, the statistics, agreement and causal-check sections are laid out,
every image decodes, no request leaves the page; a screenshot is
kept in build/browser/. A page made to break each rule shows that the checks can fail.

Without chromium the test is skipped on a developer's machine and fails under CI
(CI=true), where `make test` installs it first (`make browser`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mechhi.report import ReportInput, StoreEntry, build_report
from tests.browser import chromium, open_page
from tests.causal_results import ablate_result, edit_result
from tests.figure_stores import fake_experiment, store_with_images

SCREENSHOTS = Path(__file__).resolve().parent.parent / "build" / "browser"


@pytest.fixture(scope="module", autouse=True)
def browser_present():
    missing = chromium() is None
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing = True
    if missing and os.environ.get("CI"):
        pytest.fail("chromium or playwright missing: `make browser` installs chromium, `.[dev]` playwright")
    if missing:
        pytest.skip("chromium or playwright missing (make browser installs chromium)")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    ds = store_with_images(tmp, n=4, n_layers=5, n_heads=3)
    fake_experiment(tmp / "exp")
    ablate_result(tmp / "s.zarr", tmp / "ablate")
    edit_result(tmp / "s.zarr", tmp / "edit")
    report = ReportInput(
        [StoreEntry("toy-model", tmp / "s.zarr", ds)],
        experiment=tmp / "exp",
        ablate=tmp / "ablate",
        edit=tmp / "edit",
        n_resamples=200,
        gallery_samples=3,
        gallery_heads=3,
    )
    return build_report(report, tmp / "out"), ds


def test_report_in_chromium(page):
    path, ds = page
    shot = SCREENSHOTS / "report.png"
    facts = open_page(path, shot, full_page=True)
    assert facts.title == "mechhi report: toy-model"
    assert facts.ranking_columns[:2] == ["rank", "layer"]
    assert facts.ranking_rows == ds.sizes["layer"]  # one row per layer
    assert len(facts.images) >= 5 + 3 * 3  # figures, overlay, experiment, ablation, edit, 3 x 3 gallery
    assert {"statistics", "agreement", "experiment", "ablation", "edit"} <= set(facts.sections)
    assert facts.broken_images == []  # every image decoded (naturalWidth > 0)
    assert facts.outside_requests == []
    assert shot.stat().st_size > 20_000


def test_the_checks_catch_a_leaking_page(page, tmp_path):
    path, _ = page
    html = path.read_text()
    bad = tmp_path / "bad.html"
    broken = '<img alt="broken" src="data:image/png;base64,AAAA">'
    leaking = '<img alt="remote" src="http://example.invalid/figure.png">'  # aborted inside the browser
    bad.write_text(html.replace("<main>", f"<main>{broken}{leaking}", 1))
    facts = open_page(bad)
    assert facts.outside_requests == ["http://example.invalid/figure.png"]
    assert {i["alt"] for i in facts.broken_images} == {"broken", "remote"}
