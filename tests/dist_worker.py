"""Two gloo processes exercising `Ranks` without a model: started by
tests/test_trace_distributed.py (``torch.multiprocessing``, forked), each writes what it saw."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from mechhi.trace.distributed import Ranks


def _refuse() -> None:
    raise ValueError("store s.zarr exists for a different run")


def worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    ranks = Ranks(rank, 2, rank)
    seen: dict = {"value": ranks.on_main(lambda: {"made_by": rank})}
    try:
        ranks.on_main(_refuse)
    except Exception as error:
        seen["raised"] = [type(error).__name__, str(error)]
    ranks.barrier()  # every rank got here: no rank hangs on rank 0's failure
    dist.destroy_process_group()
    Path(out_dir, f"{rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    # fork: the children share the imports made once here (spawn would import torch twice more)
    mp.start_processes(worker, args=(sys.argv[1], sys.argv[2]), nprocs=2, start_method="fork")
