"""Several processes tracing one store: ``torchrun --nproc-per-node N -m mechhi trace ...``.

Why a module of its own: the trace job is the same for one process and for N; what
differs is who creates the store, which pending samples each process traces and when the
processes wait for each other. That is all here, so the job reads as the one-process job
and one process (``SINGLE``) pays nothing.

The protocol (``mechhi.trace.trace_dataset.trace_dataset``):

1. every rank loads the model (rank r on ``cuda:LOCAL_RANK``, or the CPU) and the samples;
2. rank 0 alone takes the store's writer lock, creates (or checks) the store and lists the
   pending samples; each step's result, or its error, reaches every rank (`Ranks.on_main`),
   so an incompatible store is one error on every rank, not a hang;
3. each rank traces the pending samples of the shards it owns (`Ranks.share`: the shards
   holding pending samples, dealt round-robin). A shard file is rewritten on every write
   into it (``mechhi.store.layout``), so two ranks never write one shard;
4. a barrier: rank 0 releases the lock (and the CLI scores) only when every rank is done.

A killed rank's samples are simply not done: torchrun stops the other ranks, and a rerun
(with any number of ranks) traces what is pending. Process groups are gloo: only small
Python objects and barriers cross processes, never tensors, so gloo serves CUDA ranks too.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from mechhi.store.schema import StoreError

T = TypeVar("T")

# The last barrier waits for the slowest rank's whole share of the trace; torchrun stops
# every rank when one dies, so a long timeout never hides a dead peer.
BARRIER_TIMEOUT = _dt.timedelta(hours=24)


class PeerFailed(StoreError):
    """Rank 0 failed a step that every rank waited on; rank 0 reports the reason itself."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world``, ``local_rank`` on its host."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, asked: str) -> str:
        """The device this rank traces on: with several ranks, ``auto`` (when CUDA is
        there) and ``cuda`` become ``cuda:LOCAL_RANK``, one GPU per rank (ranks beyond the
        host's GPUs share them, round-robin)."""
        if self.world == 1:
            return asked
        import torch

        if asked == "cuda" or (asked == "auto" and torch.cuda.is_available()):
            return f"cuda:{self.local_rank % max(torch.cuda.device_count(), 1)}"
        return "cpu" if asked == "auto" else asked

    def on_main(self, step: Callable[[], T]) -> T:
        """Run `step` on rank 0 only; every rank returns its result, or raises its error
        (rank 0 its own exception, the others `PeerFailed`)."""
        if self.world == 1:
            return step()
        import torch.distributed as dist

        payload: list = [None]
        error: BaseException | None = None
        if self.main:
            try:
                payload[0] = (step(), None)
            except Exception as caught:
                error, payload[0] = caught, (None, " ".join(str(caught).split()) or type(caught).__name__)
        dist.broadcast_object_list(payload, src=0)
        if error is not None:
            raise error
        value, message = payload[0]
        if message is not None:
            raise PeerFailed(f"rank {self.rank}: rank 0 failed: {message}")
        return value

    def share(self, pending: np.ndarray, shard: int) -> np.ndarray:
        """This rank's part of the pending samples: those in the shards it owns (the shards
        holding pending samples, in order, dealt round-robin), so no shard has two writers."""
        if self.world == 1:
            return pending
        shards = np.unique(np.asarray(pending) // shard)
        mine = shards[self.rank :: self.world]
        return pending[np.isin(pending // shard, mine)]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    @contextmanager
    def held_by_main(self, lock: AbstractContextManager) -> Iterator[None]:
        """Hold `lock` on rank 0 for the whole job (taken before anything is written; its
        refusal raised on every rank) and release it only after every rank is done."""
        if self.world == 1:
            with lock:
                yield
            return
        self.on_main(lambda: lock.__enter__() and None)
        try:
            yield
            self.barrier()  # every rank's shards are written
        finally:
            if self.main:
                lock.__exit__(*sys.exc_info())

    def say(self, message: str) -> None:
        """A note on stderr, from rank 0 only (the other ranks' notes would repeat it)."""
        if self.main:
            print(message, file=sys.stderr)


SINGLE = Ranks()


def from_env() -> Ranks:
    """The ranks torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); `SINGLE`
    outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def session() -> Iterator[Ranks]:
    """This process's `Ranks`, its process group joined for the block (gloo) and left at
    the end; outside torchrun, `SINGLE` and no group."""
    ranks = from_env()
    if ranks.world == 1:
        yield ranks
        return
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    try:
        yield ranks
    finally:
        dist.destroy_process_group()
