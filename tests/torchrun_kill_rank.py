"""A torchrun entry point for tests: ``mechhi trace`` whose rank 1 dies (``os._exit``, no
cleanup, as a killed process) right after its first batch is flagged done."""

import functools
import os

from mechhi.commands import main
from mechhi.trace import trace_dataset as job


def _die(number: int, indices: list[int]) -> None:
    os._exit(3)


if os.environ.get("RANK") == "1":
    job.trace_dataset = functools.partial(job.trace_dataset, on_batch=_die)

main()
