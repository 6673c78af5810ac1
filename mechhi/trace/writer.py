"""Store writes on a thread of their own, so that the next batch's forward runs while
this batch's grids, masks and IoU are written.

Why a thread: a region write is mostly compression and file I/O, which release the GIL,
and it must not hold up the model. Why bounded: the forward makes a new cube while one
is written, so without a bound a slow disk would let cubes pile up in memory.
`reserve` (called before each forward) waits until fewer than ``depth`` batches are
unwritten, so at most ``depth`` (default 2) batches of cubes exist at any time: one being
written and one being made.

What happens to finished work:

- on a normal exit, and when the forward's thread raises (an out-of-memory error, a
  KeyboardInterrupt), every batch already handed over is still written before the
  exception goes on: nothing the model computed is lost;
- when a write (or the callback after it) raises, the writer writes nothing more and
  the error is raised in the forward's thread at its next `reserve`, `submit` or exit.
  Batches written before it stay written (and flagged done), later ones are not: the
  store looks exactly as if the process had been killed at that point.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
_STOP = object()
_POLL_S = 0.1  # how often a waiting forward thread looks for a writer error


class BackgroundWriter(Generic[T]):
    """Runs ``write(item)`` for each submitted item, in order, on one thread.

    >>> with BackgroundWriter(print) as writer:
    ...     for item in ["a", "b"]:
    ...         writer.reserve()
    ...         writer.submit(item)
    a
    b
    """

    def __init__(
        self, write: Callable[[T], None], *, depth: int = 2, name: str = "mechhi-store-writer"
    ) -> None:
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self._write = write
        self._slots = threading.Semaphore(depth)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        # daemon: a second Ctrl-C during the final drain still ends the process (a batch
        # cut off mid-write is not flagged done, so a rerun traces it again)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def reserve(self) -> None:
        """Wait for room for one more batch (fewer than ``depth`` unwritten)."""
        while not self._slots.acquire(timeout=_POLL_S):
            self._raise_error()
        self._raise_error()

    def submit(self, item: T) -> None:
        """Hand over one item; call `reserve` before making it."""
        self._raise_error()
        self._queue.put(item)

    def close(self) -> None:
        """Write everything handed over (unless a write failed), then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join()

    def __enter__(self) -> BackgroundWriter[T]:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: object
    ) -> None:
        self.close()
        if kind is None:
            self._raise_error()

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            try:
                if self._error is None:
                    self._write(item)
            except BaseException as error:
                self._error = error
            finally:
                self._slots.release()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error
