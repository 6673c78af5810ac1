"""`mechhi bench`: floor vs capture vs eager, as processes and their figures.

Each mode's peak memory comes from a process of its own (`worker` ``memory`` jobs), so
one mode's allocations never sit under another's high-water mark. Times come from one
``timing`` process per config in which the modes run interleaved, so each ratio to the
floor compares runs made moments apart (a busy machine slows both alike). On CPU the
clock is the process's CPU time and every process gets one thread, two processes at a
time on two cores: another program's load then stretches the wall clock, not the
figures.

Eager runs only where it fits: its need is predicted from the measured floor (the
floor's peak plus the L returned (B, H, S, S) matrices, `modes.eager_extra_bytes`) and
compared with the memory free now; where it does not fit the table says so, with the
prediction.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mechhi.bench.configs import DEFAULT_CONFIGS, NARROW, config_named, narrow_name, qwen2_vl_geometry
from mechhi.bench.memory import available_bytes
from mechhi.bench.modes import eager_extra_bytes
from mechhi.bench.worker_job import PROGRESS, Job
from mechhi.devices import resolve_device

FIT_MARGIN = 0.85  # eager runs if its predicted peak is under this share of the free memory
OVERHEAD_TOKENS = qwen2_vl_geometry(441).visual_tokens  # 21 x 21: ~460 tokens a sample with the prompt
OVERHEAD_BATCH = 4  # `mechhi trace`'s default batch size


class BenchError(RuntimeError):
    """A benchmark process failed; the message is its last line of stderr."""


@dataclass(frozen=True)
class BenchOptions:
    """What `mechhi bench` measures; `QUICK` is the ``--quick`` set."""

    configs: tuple[str, ...] = DEFAULT_CONFIGS
    targets: tuple[int, ...] = (256, 1024, 4096, 8192)  # visual tokens per sample
    layers: int | None = None  # None: each checkpoint's own depth
    batch_size: int = 1
    device: str = "auto"
    dtype: str = "auto"
    rounds: int = 3  # timed rounds after the warm-up
    threads: int | None = None  # per process; default 1 on CPU
    jobs: int | None = None  # processes at once; default cores / threads on CPU, 1 on CUDA
    eager: bool = True
    timing: bool = True  # False: peak memory only (one run per mode and size)
    overhead: bool = True  # nnsight's fixed cost per trace, at `mechhi trace`'s batch size

    def __post_init__(self) -> None:
        for name in self.configs:
            config_named(name)  # raises on an unknown name
        if not self.configs or not self.targets:
            raise ValueError("nothing to measure: give at least one config and one size")


QUICK = {"layers": 2, "targets": (256, 1024), "rounds": 2}


@dataclass
class Cell:
    """One config at one size: what each mode cost."""

    config: str
    layers: int
    batch_size: int
    target: int
    visual_tokens: int
    seq_len: int
    dtype: str = "float32"
    seconds: dict[str, float] = field(default_factory=dict)  # median per mode
    ratio: dict[str, float] = field(default_factory=dict)  # median of mode / floor, per round
    peak_bytes: dict[str, int] = field(default_factory=dict)
    held_bytes: dict[str, int] = field(default_factory=dict)  # before the run: weights and runtime
    eager_predicted_bytes: int | None = None
    eager_skipped: str | None = None

    def samples_per_second(self, mode: str) -> float | None:
        seconds = self.seconds.get(mode)
        return self.batch_size / seconds if seconds else None


@dataclass
class Report:
    device: str
    dtype: str
    clock: str
    peak_kind: str
    options: dict[str, Any]
    cells: list[Cell]
    overhead: list[Cell]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        """The report back from `to_json` (``mechhi bench --json`` output; extra keys ignored)."""
        fields = {k: data[k] for k in ("device", "dtype", "clock", "peak_kind", "options")}
        cells = [Cell(**c) for c in data["cells"]]
        return cls(**fields, cells=cells, overhead=[Cell(**c) for c in data["overhead"]])


def bench(options: BenchOptions) -> Report:
    """Every config at every size, in subprocesses; see the module docstring."""
    device = resolve_device(options.device)  # "auto" and the dtype resolve in the workers: no CUDA here
    threads = options.threads or (1 if device.type == "cpu" else None)
    jobs = options.jobs or (max(1, (os.cpu_count() or 1) // (threads or 1)) if device.type == "cpu" else 1)
    base = {
        "layers": options.layers,
        "batch_size": options.batch_size,
        "device": str(device),
        "dtype": options.dtype,
        "rounds": options.rounds,
        "threads": threads,
    }
    targets = sorted(options.targets)
    memory = _run_all(
        [Job("memory", c, targets, [m], **base) for c in options.configs for m in ("floor", "capture")], jobs
    )
    cells = _merge([], memory, create=True)
    free = _free_bytes(device, memory)
    skip = _eager_plan(cells, free, options.eager)
    eager = [
        Job("memory", c, targets, ["eager"], skip={"eager": skip[c]}, **base)
        for c in options.configs
        if len(skip[c]) < len(targets)
    ]
    together = sum(c.eager_predicted_bytes or 0 for c in cells if not c.eager_skipped) <= FIT_MARGIN * free
    _merge(cells, _run_all(eager, jobs if together else 1))
    timing = [
        Job("timing", c, targets, ["floor", "capture", "eager"], skip={"eager": skip[c]}, **base)
        for c in options.configs
        if options.timing
    ]
    overhead = _overhead_jobs(options, base) if options.overhead and options.timing else []
    timed = _run_all(timing + overhead, jobs)
    _merge(cells, timed[: len(timing)])
    overhead_cells = _merge([], timed[len(timing) :], create=True)
    dtype = memory[0]["results"][0]["dtype"]
    clock = "wall" if device.type == "cuda" else "process CPU time"
    return Report(
        str(device),
        dtype,
        clock,
        memory[0]["results"][0]["peak_kind"],
        asdict(options),
        cells,
        overhead_cells,
    )


def _free_bytes(device: torch.device, memory: list[dict[str, Any]]) -> int:
    """Memory a new process could take: on CUDA as the floor's process saw it (asking here
    would open a CUDA context in this process for the whole run)."""
    if device.type != "cuda":
        return available_bytes(device)
    return min(r["free_bytes"] for out in memory for r in out["results"] if "free_bytes" in r)


def _overhead_jobs(options: BenchOptions, base: dict[str, Any]) -> list[Job]:
    """nnsight's fixed cost per trace, at ~460 tokens a sample and `mechhi trace`'s batch
    size. It is a cost per module and per operation, not per token, so it is measured on
    the first config's narrow twin at full depth, where the forward is mostly Python and
    an empty trace's extra milliseconds stand out; the first config as benchmarked gives
    the batch's forward it is a share of (and the capture's samples per second)."""
    config = options.configs[0]
    settings = {**base, "batch_size": OVERHEAD_BATCH}
    jobs = [Job("timing", config, [OVERHEAD_TOKENS], ["floor", "capture"], **settings)]
    narrow = config if config.endswith(NARROW) else narrow_name(config)
    jobs.append(
        Job(
            "timing",
            narrow,
            [OVERHEAD_TOKENS],
            ["floor", "nnsight", "capture"],
            **{**settings, "layers": None},
        )
    )
    return jobs


def _merge(cells: list[Cell], measured: list[dict[str, Any]], create: bool = False) -> list[Cell]:
    """Fold job results into cells keyed by (config, batch size, target)."""
    by_key = {(c.config, c.batch_size, c.target): c for c in cells}
    for out in measured:
        job = out["job"]
        for result in out["results"]:
            key = (job["config"], job["batch_size"], result["target"])
            if key not in by_key:
                if not create:
                    continue
                by_key[key] = Cell(
                    job["config"],
                    result["layers"],
                    job["batch_size"],
                    result["target"],
                    result["visual_tokens"],
                    result["seq_len"],
                    result["dtype"],
                )
                cells.append(by_key[key])
            cell = by_key[key]
            for name in ("seconds", "ratio", "peak_bytes", "held_bytes"):
                getattr(cell, name).update(result.get(name, {}))
    order = {name: i for i, name in enumerate(dict.fromkeys(out["job"]["config"] for out in measured))}
    cells.sort(key=lambda c: (order.get(c.config, len(order)), c.batch_size, c.target))  # configs as asked
    return cells


def _eager_plan(cells: list[Cell], free: int, wanted: bool) -> dict[str, list[int]]:
    """Targets per config where eager is skipped; the cells say why."""
    skip: dict[str, list[int]] = {c.config: [] for c in cells}
    for cell in cells:
        text = config_named(cell.config).text
        extra = eager_extra_bytes(
            layers=cell.layers,
            batch=cell.batch_size,
            heads=text.heads,
            seq=cell.seq_len,
            dtype=getattr(torch, cell.dtype),
        )
        cell.eager_predicted_bytes = cell.peak_bytes["floor"] + extra
        if not wanted:
            cell.eager_skipped = "not asked for"
        elif cell.eager_predicted_bytes > FIT_MARGIN * free:
            cell.eager_skipped = (
                f"needs ~{cell.eager_predicted_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
            )
        if cell.eager_skipped:
            skip[cell.config].append(cell.target)
    return skip


def _run_all(jobs: list[Job], parallel: int) -> list[dict[str, Any]]:
    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(_run_one, jobs))


def _run_one(job: Job) -> dict[str, Any]:
    """One worker process: its progress lines pass through to stderr as they come, its
    stdout is the JSON result."""
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    if job.threads:
        env["OMP_NUM_THREADS"] = str(job.threads)
    command = [sys.executable, "-m", "mechhi.bench.worker", json.dumps(asdict(job))]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as child:
        errors = []
        for line in child.stderr:  # the result comes on stdout only at the end: no deadlock
            if line.startswith(PROGRESS):
                sys.stderr.write(line)
            else:
                errors.append(line.rstrip())
        output = child.stdout.read()
    if child.returncode != 0:
        last = next((e for e in reversed(errors) if e.strip()), "no output")
        raise BenchError(f"{job.kind} job for {job.config} ({'/'.join(job.modes)}) failed: {last}")
    return json.loads(output.strip().splitlines()[-1])
