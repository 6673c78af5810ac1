"""What the benchmark's parent asks of a worker process (`worker`), as JSON on its command line."""

from __future__ import annotations

from dataclasses import dataclass, field

PROGRESS = "bench: "  # stderr lines that the parent passes on as progress


@dataclass
class Job:
    kind: str  # "memory" | "timing"
    config: str
    targets: list[int]  # visual tokens, one model per target
    modes: list[str]  # one for memory; timing interleaves them ("floor" first)
    layers: int | None = None
    batch_size: int = 1
    device: str = "cpu"
    dtype: str = "float32"  # or "auto": bfloat16 on a GPU that has it
    rounds: int = 3
    threads: int | None = None
    skip: dict[str, list[int]] = field(default_factory=dict)  # mode -> targets it does not run at
