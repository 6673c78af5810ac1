"""End-to-end `mechhi trace` throughput against the traced forward alone, and against
the trace loop of an earlier revision: samples per second, measured interleaved in one
process (round after round: before, after, forward only) so that a noisy machine moves
all three alike.

    python scripts/trace_throughput.py --dataset /tmp/syn1000 --limit 200 --before 9cbbeac

``--before REV``: the git revision whose `mechhi/trace/trace_dataset.py` is the old loop (imported
from ``git show REV:mechhi/trace/trace_dataset.py`` beside the current package). Each trace gets a
fresh store and the already loaded model, so model loading is not timed; dataset
loading, grid sizing, store creation, data loading, the forward and the writes are. The
forward-only rate runs the same model through `AttentionTracer.trace` on batches prepared
beforehand (no image decoding, processing, mask coverage or writing). Prints JSON:
samples per second of wall time (median over rounds), and CPU seconds per sample of
this process (all its threads; DataLoader worker processes are not counted), which a
machine shared with other work disturbs far less than wall time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mechhi.models.loading import load
from mechhi.trace.attention import AttentionTracer
from mechhi.trace.trace_dataset import TraceConfig, load_samples, prompt_fields


def old_job(revision: str):
    """The trace job module of ``revision``, importable next to today's package."""
    source = subprocess.run(
        ["git", "show", f"{revision}:mechhi/trace/trace_dataset.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    spec = importlib.util.spec_from_loader("mechhi.trace._job_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "mechhi.trace"
    sys.modules[spec.name] = module
    exec(compile(source, f"{revision}:mechhi/trace/trace_dataset.py", "exec"), module.__dict__)
    return module


def timed_trace(job, config, loaded, work: Path, name: str) -> tuple[float, float]:
    store = work / f"{name}-{time.monotonic_ns()}.zarr"
    fields = {k: v for k, v in vars(config).items() if k in job.TraceConfig.__dataclass_fields__}
    start, cpu = time.perf_counter(), time.process_time()
    job.trace_dataset(job.TraceConfig(**{**fields, "store": str(store)}), progress=False, loaded=loaded)
    return time.perf_counter() - start, time.process_time() - cpu


def timed_forward(config, loaded) -> tuple[float, float]:
    model, adapter = loaded
    samples = load_samples(config, adapter).samples[: config.limit]
    fields = prompt_fields(config, samples)
    batches = [
        adapter.prepare(
            [s.image() for s in samples[i : i + config.batch_size]],
            [s.description for s in samples[i : i + config.batch_size]],
            template=config.template,
            fields=fields[i : i + config.batch_size],
        )
        for i in range(0, len(samples), config.batch_size)
    ]
    tracer = AttentionTracer(model, adapter)
    start, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        tracer.trace(batch)
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model", default=TraceConfig().model)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", default=None, help="git revision of the old trace loop")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    config = TraceConfig(
        model=args.model,
        dataset=args.dataset,
        split="all",
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.num_workers,
    )
    loaded = load(config.model, device=config.device, dtype=config.dtype)
    import mechhi.trace.trace_dataset as new

    modes = {
        "after": lambda w: timed_trace(new, config, loaded, w, "after"),
        "forward_only": lambda w: timed_forward(config, loaded),
    }
    if args.before:
        before = old_job(args.before)
        modes = {"before": lambda w: timed_trace(before, config, loaded, w, "before"), **modes}
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    cpu: dict[str, list[float]] = {name: [] for name in modes}
    with tempfile.TemporaryDirectory() as work:
        for round_ in range(args.rounds):
            for name, run in modes.items():
                wall, used = run(Path(work))
                seconds[name].append(wall)
                cpu[name].append(used)
                print(
                    f"round {round_ + 1}: {name} {args.limit / wall:.2f} samples/s, "
                    f"{used / args.limit:.3f} CPU s/sample",
                    file=sys.stderr,
                )
    rate = {name: args.limit / statistics.median(s) for name, s in seconds.items()}
    cpu_per_sample = {name: statistics.median(s) / args.limit for name, s in cpu.items()}
    result = {
        "samples": args.limit,
        "batch_size": args.batch_size,
        "num_workers": config.workers(next(loaded[0].parameters()).device),
        "device": str(next(loaded[0].parameters()).device),
        "dtype": str(next(loaded[0].parameters()).dtype),
        "threads": __import__("torch").get_num_threads(),
        "seconds": seconds,
        "samples_per_s": rate,
        "cpu_s_per_sample": cpu_per_sample,
        "after_over_forward_only": rate["after"] / rate["forward_only"],
        "after_over_forward_only_cpu": cpu_per_sample["forward_only"] / cpu_per_sample["after"],
    }
    if "before" in rate:
        result["after_over_before"] = rate["after"] / rate["before"]
        result["before_over_forward_only"] = rate["before"] / rate["forward_only"]
        result["before_over_forward_only_cpu"] = cpu_per_sample["forward_only"] / cpu_per_sample["before"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
