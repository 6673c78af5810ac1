"""Progress of long work, always on stderr (stdout carries only a command's result).

On a terminal: a rich bar. Anywhere else (stderr into a log file, a batch scheduler's
output, a pipe) a live bar cannot be drawn, and rich would print it only once the work
has ended; there a plain line such as ``fine-tuning: 40/100 (40%) 12.3 s loss 0.412`` is
written every ~5% of the work or every ~10 s, whichever comes first, and once at the end,
so a log shows the work moving while it runs.

>>> with progress_bar("tracing", total=len(batches)) as bar:     # doctest: +SKIP
...     for batch in batches:
...         bar.advance(1, info=f"{len(batch)} samples")
>>> for item in tracked(items, "ablating"):                       # doctest: +SKIP
...     ...
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

PLAIN_SHARE = 0.05  # a plain line at least every 5% of the work ...
PLAIN_SECONDS = 10.0  # ... or every 10 s of it, whichever comes first

T = TypeVar("T")


class Advance(Protocol):
    def advance(self, n: int = 1, *, info: str = "") -> None:
        """``n`` more units done; ``info`` (a loss, a count) is shown beside the count."""


def on_terminal() -> bool:
    """Whether stderr is a terminal (or a notebook) that a live bar can be drawn on."""
    from rich.console import Console

    console = Console(stderr=True)
    return console.is_terminal or console.is_jupyter


class _Hidden:
    def advance(self, n: int = 1, *, info: str = "") -> None:
        pass


class _Rich:
    def __init__(self, bar: Any, task: Any) -> None:
        self._bar, self._task = bar, task

    def advance(self, n: int = 1, *, info: str = "") -> None:
        self._bar.update(self._task, advance=n, info=info)


class PlainLines:
    """``label: done/total (pct%) seconds info`` lines on stderr, every ``PLAIN_SHARE`` of
    ``total`` or ``PLAIN_SECONDS``, and the last state on ``finish``."""

    def __init__(self, label: str, total: int, completed: int = 0) -> None:
        self.label, self.total, self.done = label, total, completed
        self._began = self._last_time = time.monotonic()
        self._last_done, self._info = completed, ""
        self._step = max(1, math.ceil(total * PLAIN_SHARE))
        self._lock = threading.Lock()  # the tracer advances from its writer thread

    def advance(self, n: int = 1, *, info: str = "") -> None:
        with self._lock:
            self.done += n
            self._info = info
            now = time.monotonic()
            due = self.done - self._last_done >= self._step or now - self._last_time >= PLAIN_SECONDS
            if due or self.done >= self.total:
                self._write(now)

    def finish(self) -> None:
        with self._lock:
            if self.done != self._last_done:
                self._write(time.monotonic())

    def _write(self, now: float) -> None:
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        info = f" {self._info}" if self._info else ""
        sys.stderr.write(f"{self.label}: {self.done}/{self.total}{share} {now - self._began:.1f} s{info}\n")
        sys.stderr.flush()
        self._last_done, self._last_time = self.done, now


@contextlib.contextmanager
def progress_bar(
    label: str, total: int, *, show: bool = True, completed: int = 0, transient: bool = False
) -> Iterator[Advance]:
    """Yields an ``Advance``: a rich bar on a terminal, plain lines elsewhere, nothing
    unless ``show``. ``completed`` units were done before (a resumed run)."""
    if not show:
        yield _Hidden()
        return
    if not on_terminal():
        lines = PlainLines(label, total, completed)
        yield lines
        lines.finish()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=transient) as bar:
        yield _Rich(bar, bar.add_task(label, total=total, completed=completed, info=""))


def tracked(
    items: Sequence[T] | Iterable[T],
    label: str,
    *,
    show: bool = True,
    transient: bool = False,
    total: int | None = None,
) -> Iterator[T]:
    """Iterate ``items`` with ``progress_bar`` advancing once per item."""
    count = total if total is not None else len(items)  # type: ignore[arg-type]
    with progress_bar(label, count, show=show, transient=transient) as bar:
        for item in items:
            yield item
            bar.advance()
