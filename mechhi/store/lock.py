"""One writer per store: a lock file beside the store naming the process that writes it.

Why: two `mechhi trace` runs on one store would each trace every pending sample (twice
the work, and two processes rewriting the same chunks), and two creations at once race
on the directory. Tracing and saving scores take the store's writer lock first; a
second process is refused at once with a message naming the holder.

The lock is ``<store>.lock`` (e.g. ``stores/toy.zarr.lock``), a filelock ``SoftFileLock``:
created with ``O_CREAT | O_EXCL``, it records the holder's pid and host; a lock left by
a process that no longer runs on this host is stale and taken over (said so on stderr).
A lock held from another host cannot be probed: the message says which host and pid,
and that deleting the file is safe once that process is gone.

Cooperating processes of one job (torchrun ranks) are not independent writers: rank 0
takes this lock for the job before it creates the store and releases it after every rank
is done; the other ranks write only their own shards under it without taking it (see
``mechhi.trace.distributed``).

>>> with WriterLock("stores/toy.zarr"):  # doctest: +SKIP
...     ...  # create, write batches, save scores
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import TracebackType

import filelock

from mechhi.store.schema import StoreError


class StoreLocked(StoreError):
    """Another process holds the store's writer lock."""


def lock_path(store: str | Path) -> Path:
    """The lock file of a store: ``<store>.lock`` beside it (never inside: it must exist
    before the store does, and a copied store must not carry it)."""
    store = Path(store)
    return store.with_name(store.name + ".lock")


def lock_holder(store: str | Path) -> tuple[int, str] | None:
    """(pid, host) recorded in the store's lock file, or None if there is none (or it is
    unreadable)."""
    try:
        lines = lock_path(store).read_text(encoding="utf-8").splitlines()
        return int(lines[0]), lines[1]
    except (OSError, ValueError, IndexError):
        return None


class WriterLock:
    """The store's writer lock, taken without waiting; `StoreLocked` if another process
    holds it. Reentrant within one instance, not across instances."""

    def __init__(self, store: str | Path) -> None:
        self.store = Path(store)
        self.path = lock_path(self.store)
        self._lock = filelock.SoftFileLock(str(self.path), timeout=0)

    def acquire(self) -> WriterLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        before = lock_holder(self.store)
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise StoreLocked(self._refusal()) from None
        if before is not None and before[1] == this_host() and not process_alive(before[0]):
            print(
                f"note: took over the stale lock {self.path} of pid {before[0]}, which no longer runs",
                file=sys.stderr,
            )
        return self

    def release(self) -> None:
        self._lock.release()

    def _refusal(self) -> str:
        holder = lock_holder(self.store)
        who = f"pid {holder[0]} on host {holder[1]}" if holder else "another process"
        here = holder is not None and holder[1] == this_host()
        gone = "" if here else f"; if that process is gone, delete {self.path}"
        return f"store {self.store} is being written by {who} (lock {self.path}): wait for it to finish{gone}"

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.release()


def this_host() -> str:
    """This machine's name, as lock files and staging names record it."""
    import socket

    return socket.gethostname()


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
