"""Open an HTML page in headless Chromium (Debian's package, driven by Playwright through
``executable_path``; Playwright's own browser downloads are never used) and report what a
reader's browser sees: the ranking table's rows, whether every image decoded, and every
request the page made; with a screenshot.

Every request is routed: the page itself is served, anything else is recorded and
aborted inside the browser, so a page that would fetch from the network is caught
without a single packet leaving the machine.

    python -m tests.browser build/report/index.html docs/figures/report.png [SECTION_ID]
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

BROWSERS = ("chromium", "chromium-headless-shell", "chromium-browser")
VIEWPORT = {"width": 1280, "height": 900}


def chromium() -> str | None:
    """Path of the system's Chromium, or None (`make browser` installs Debian's)."""
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


@dataclass
class PageFacts:
    ranking_rows: int
    ranking_columns: list[str]
    images: list[dict]  # {"alt", "complete", "width"} per <img>
    outside_requests: list[str] = field(default_factory=list)  # every request but the page itself
    title: str = ""
    sections: list[str] = field(
        default_factory=list
    )  # ids of the <section>s the browser lays out (height > 0)

    @property
    def broken_images(self) -> list[dict]:
        return [i for i in self.images if not (i["complete"] and i["width"] > 0)]


def open_page(
    page_path: Path, screenshot: Path | None = None, *, full_page: bool = False, section: str | None = None
) -> PageFacts:
    """Load `page_path` in headless Chromium and read back what it shows; the screenshot
    shows the whole page, or the window scrolled to `section` (an element id), or its top."""
    from playwright.sync_api import sync_playwright

    executable = chromium()
    if executable is None:
        raise RuntimeError("no chromium found: run `make browser` (apt-get install chromium)")
    url = page_path.resolve().as_uri()
    seen: list[str] = []

    def route(r) -> None:  # serve the page itself; abort anything else before it leaves
        r.continue_() if r.request.url == url else r.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.route("**/*", route)
            page.on("request", lambda r: seen.append(r.url))
            page.goto(url, wait_until="load")
            facts = PageFacts(
                ranking_rows=page.locator("table#ranking-0 tbody tr").count(),
                ranking_columns=page.locator("table#ranking-0 thead th").all_inner_texts(),
                images=page.eval_on_selector_all(
                    "img", "els => els.map(e => ({alt: e.alt, complete: e.complete, width: e.naturalWidth}))"
                ),
                outside_requests=[u for u in seen if u != url and not u.startswith("data:")],
                title=page.title(),
                sections=page.eval_on_selector_all(
                    "section", "els => els.filter(e => e.getBoundingClientRect().height > 0).map(e => e.id)"
                ),
            )
            if screenshot is not None:
                if section:
                    page.evaluate("id => document.getElementById(id).scrollIntoView()", section)
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot), full_page=full_page)
        finally:
            browser.close()
    return facts


if __name__ == "__main__":  # pragma: no cover - a developer's screenshot tool
    shot, at = (
        (Path(sys.argv[2]) if len(sys.argv) > 2 else None),
        (sys.argv[3] if len(sys.argv) > 3 else None),
    )
    facts = open_page(Path(sys.argv[1]), shot, section=at)
    print(
        f"{facts.title}: {facts.ranking_rows} ranking rows, {len(facts.images)} images "
        f"({len(facts.broken_images)} broken), {len(facts.outside_requests)} outside requests"
    )
