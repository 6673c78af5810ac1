"""One benchmark process: ``python -m mechhi.bench.worker '<job as JSON>'``.

A process measures one thing, so that what it measures is not mixed with another
mode's memory:

- ``memory``: one mode's peak memory at each size, the high-water mark reset just
  before the mode runs (after the build), one run per size;
- ``timing``: several modes interleaved in this one process (a warm-up run of each,
  then rounds of mode after mode), so that a ratio to the floor compares runs made
  moments apart on the same busy machine.

Consecutive sizes that need the same model (Qwen2-VL and SmolVLM: only the processor
changes) share one build.

It prints one JSON object on stdout; anything else goes to stderr.
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch

from mechhi.bench.configs import build, config_named
from mechhi.bench.memory import PeakMemory, available_bytes
from mechhi.bench.modes import Harness
from mechhi.bench.worker_job import PROGRESS, Job
from mechhi.devices import resolve_device, resolve_dtype


def run_job(job: Job) -> list[dict[str, Any]]:
    """Per target: what was measured (JSON-ready). Consecutive sizes that need the same
    model share it (and its `Harness`); only their processors and batches are new."""
    if job.threads:
        torch.set_num_threads(job.threads)
    device = resolve_device(job.device)
    dtype = resolve_dtype(job.dtype, device)
    config = config_named(job.config)
    results, key, built, harness, warmed = [], None, None, None, set()
    for target in job.targets:
        if config.model_key(target, job.layers) != key:
            built = harness = None  # the previous model goes before the next is built
            gc.collect()
        built = build(
            config,
            target,
            layers=job.layers,
            batch_size=job.batch_size,
            device=device,
            dtype=dtype,
            model=None if built is None else built.model,
        )
        harness = harness or Harness.around(built.model, built.adapter)
        key = config.model_key(target, job.layers)
        modes = [m for m in job.modes if target not in job.skip.get(m, [])]
        calls = harness.calls(built.batch)
        if job.kind == "memory":
            measured = _memory(calls, modes, device)
        else:
            warm = modes if device.type == "cuda" else [m for m in modes if m not in warmed]
            measured = _timing(calls, modes, device, job.rounds, warm)
            warmed.update(modes)
        results.append(
            {
                "target": target,
                "visual_tokens": built.geometry.visual_tokens,
                "seq_len": built.seq_len,
                "layers": built.adapter.n_layers,
                "dtype": str(dtype).removeprefix("torch."),
                **measured,
            }
        )
        print(
            f"{PROGRESS}{job.config}: {job.kind} of {'/'.join(modes)} at {target} visual tokens done",
            file=sys.stderr,
            flush=True,
        )
    return results


def _memory(calls: dict[str, Callable[[], Any]], modes: list[str], device: torch.device) -> dict[str, Any]:
    meter = PeakMemory(device)
    peaks, held = {}, {}
    for mode in modes:
        meter.reset()
        held[mode] = meter.current()
        calls[mode]()
        peaks[mode] = meter.peak()
    free = (
        {"free_bytes": available_bytes(device) + torch.cuda.memory_reserved(device)}
        if device.type == "cuda"
        else {}
    )
    return {"peak_bytes": peaks, "held_bytes": held, "peak_kind": meter.kind, **free}


def _timing(
    calls: dict[str, Callable[[], Any]], modes: list[str], device: torch.device, rounds: int, warm: list[str]
) -> dict[str, Any]:
    """Interleaved rounds after a warm-up run of each mode in ``warm``: on CPU, a mode's
    first run in the process (nnsight compiles the attention source once); on CUDA,
    every mode at every size (kernel choice and workspaces are per shape)."""
    if device.type == "cuda":
        sync, clock = (lambda: torch.cuda.synchronize(device)), time.perf_counter
    else:  # the process's CPU time: what its threads did, not how long others kept them waiting
        sync, clock = (lambda: None), time.process_time
    for mode in warm:
        calls[mode]()
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(rounds):
        for mode in modes:
            times[mode].append(_seconds(calls[mode], sync, clock))
    ratios = {m: statistics.median(t / f for t, f in zip(times[m], times["floor"])) for m in modes}
    return {"seconds": {m: statistics.median(t) for m, t in times.items()}, "ratio": ratios, "times": times}


def _seconds(call: Callable[[], Any], sync: Callable[[], None], clock: Callable[[], float]) -> float:
    sync()
    start = clock()
    call()
    sync()
    return clock() - start


def main(argv: list[str]) -> int:
    job = Job(**json.loads(argv[0]))
    print(json.dumps({"job": asdict(job), "results": run_job(job)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
