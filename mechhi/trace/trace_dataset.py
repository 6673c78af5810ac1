"""Trace a dataset into a store: the `mechhi trace` job.

The job is resumable by construction: the store is created once with every sample's
slot, each batch is written as one region and flagged done only after the write, and a
rerun of the same command traces only the samples not yet done (and done samples whose
data was found lost). Nothing already flagged is recomputed or lost; on a finished store
the rerun does nothing.

One writer at a time: the job holds the store's writer lock (``mechhi.store.lock``) from
before the store is created until its last batch is written, so a second `mechhi trace`
on the same store is refused instead of tracing every pending sample again.

Each batch goes through three separable steps, each on its own worker so they overlap:
``prepare`` (images and prompts -> model inputs, layouts and mask coverage) in
DataLoader worker processes (`trace.loader`, batches bucketed by sequence length),
``forward`` (the traced forward pass -> (B, L, H, V) attention on the visual tokens) in
this thread, and ``write`` (per-sample grids, masks and IoU into the batch's region of
the store) on a writer thread (`trace.writer`, at most two batches of cubes in memory).
The store's grids are sized up front from each image's size alone
(`VLMAdapter.grid_sizes`): no image is decoded or processed twice.
"""

from __future__ import annotations

import datetime as _dt
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mechhi.bundled import BUNDLED_DATASET_ID, BUNDLED_MODEL_ID, default_store, local_path
from mechhi.data.format import LARGE_IMAGE, KeyObjectDataset, Sample, load_dataset
from mechhi.data.vqa import VQA_DRAW, format_options, option_pool, sample_options
from mechhi.models import TEMPLATE_NAMES, AdapterError, PreparedBatch, VLMAdapter
from mechhi.models.loading import load, provenance
from mechhi.progress import progress_bar
from mechhi.store import (
    SampleMeta,
    WriterLock,
    create_store,
    describe,
    done_mask,
    missing_data,
    open_store,
    pad_grid,
    shard_samples,
    unflagged,
    write_batch,
)
from mechhi.store.dataset_ref import DatasetRef
from mechhi.store.verify import repair, samples_text
from mechhi.trace import loader
from mechhi.trace.attention import AttentionTracer
from mechhi.trace.distributed import SINGLE, Ranks
from mechhi.trace.loader import (
    Grids,
    LoadedBatch,
    batch_loader,
    bucketed_batches,
    default_num_workers,
    sequence_lengths,
)
from mechhi.trace.writer import BackgroundWriter
from probes.head_impact import BinarizeRule, sample_iou

# Descriptions are object descriptions (a few words to a caption); each description token
# is a query row whose attention over the whole sequence is computed in every layer.
DEFAULT_MAX_DESCRIPTION_TOKENS = 128


@dataclass(frozen=True)
class TraceConfig:
    """Defaults of `mechhi trace`: the bundled toy model on the bundled synthetic dataset."""

    model: str = BUNDLED_MODEL_ID  # HF id, local directory, or the bundled model's name
    dataset: str = BUNDLED_DATASET_ID  # directory in mechhi's dataset format, or the bundled set's name
    store: str | None = (
        None  # default: stores/<model>__<dataset>[__<template>].zarr (bundled pair: stores/toy.zarr)
    )
    limit: int | None = None  # trace only the first N samples
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"
    maps: bool = True  # False: keep only masks and IoU, not the attention cube
    template: str = "caption"  # "vqa": the closed-ended question, options drawn as in evaluation
    split: str = "auto"  # "auto": the "trace" split if the dataset has one, else all; "all"; or a split name
    skip_bad: bool = False  # skip invalid records (recorded in the store) instead of failing
    revision: str | None = None
    max_description_tokens: int = DEFAULT_MAX_DESCRIPTION_TOKENS  # longer descriptions are bad records
    vqa_seed: int = 0  # with each sample's id, draws the vqa template's distractors and the true one's place
    shard_samples: int | None = None  # samples per store shard file; None: store.layout.auto_shard_samples
    num_workers: int | None = (
        None  # DataLoader processes preparing batches (None: by device, see loader; 0: in process)
    )
    device_map: str | None = (
        None  # accelerate placement over several devices ("auto", ...); then device stays "auto"
    )

    def __post_init__(self) -> None:
        if self.template not in TEMPLATE_NAMES:
            raise ValueError(f"unknown --template {self.template!r}; choose {' or '.join(TEMPLATE_NAMES)}")
        if self.batch_size < 1 or self.max_description_tokens < 1 or (self.shard_samples or 1) < 1:
            raise ValueError("--batch-size, --max-description-tokens and --shard-samples must be at least 1")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"--num-workers must be 0 or more, got {self.num_workers}")

    def workers(self, device: torch.device) -> int:
        return default_num_workers(device) if self.num_workers is None else self.num_workers

    def store_path(self) -> Path:
        return Path(self.store) if self.store else default_store(self.model, self.dataset, self.template)


BatchCallback = Callable[[int, Sequence[int]], None]


class TraceOutOfMemory(MemoryError):
    """A batch did not fit in memory; the message names it and what to change."""


def trace_dataset(
    config: TraceConfig,
    *,
    progress: bool = True,
    on_batch: BatchCallback | None = None,
    loaded: tuple[Any, VLMAdapter] | None = None,
    lock: AbstractContextManager | None = None,
    ranks: Ranks | None = None,
) -> Path:
    """Trace every pending sample of the dataset into the store; return the store path.

    ``on_batch(batch_number, sample_indices)`` runs after each batch is flagged done, on
    the writer thread; what it raises stops the writer before the next batch and is
    raised here (tests use it to simulate a kill). ``loaded`` passes an already loaded
    (model, adapter) pair instead of loading ``config.model``; it must be that model, since
    the store records ``config.model``'s name and revision. ``lock``: what guards the
    store while this runs, by default its `WriterLock` (a second process is refused);
    cooperating ranks of one job, whose rank 0 holds the writer lock for all, pass
    ``contextlib.nullcontext()``. ``ranks``: this process's place among torchrun ranks
    (``mechhi.trace.distributed``; default one process): rank 0 takes the lock and
    creates the store, each rank traces the pending samples of its own shards.
    """
    path = config.store_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    ranks = ranks or SINGLE
    guard = lock if lock is not None else WriterLock(path) if ranks.main else nullcontext()
    with ranks.held_by_main(guard):
        device = (
            config.device if config.device_map else ranks.device(config.device)
        )  # a device map places itself
        model, adapter = loaded or load(
            config.model,
            device=device,
            dtype=config.dtype,
            revision=config.revision,
            device_map=config.device_map,
        )
        dataset = load_samples(config, adapter)
        samples = dataset.samples[: config.limit] if config.limit else dataset.samples
        if not samples:
            raise ValueError(f"no samples to trace in {config.dataset} (split {config.split!r})")
        fields = prompt_fields(config, samples, dataset)
        grids = _grids(adapter, samples)
        ranks.on_main(
            lambda: create_store(
                path,
                samples=[_meta(s, g) for s, g in zip(samples, grids)],
                n_layers=adapter.n_layers,
                n_heads=adapter.n_heads,
                attrs=_attrs(config, model, adapter, dataset),
                maps=config.maps,
                shard_samples=config.shard_samples,
            )
        )
        every, shard = ranks.on_main(lambda: pending_samples(path)), shard_samples(path)
        pending = ranks.share(every, shard)
        if ranks.world > 1:
            n_shards = len(set((every // shard).tolist()))
            ranks.say(
                f"{ranks.world} ranks trace {len(every)} pending samples in {n_shards} shards of up to "
                f"{shard} samples, each rank its own shards"
                + (
                    " (one shard: rank 0 does it all; a new store with a smaller "
                    "--shard-samples spreads a small one)"
                    if n_shards == 1
                    else ""
                )
            )
        if len(pending):
            _trace_pending(
                path,
                config,
                model,
                adapter,
                samples,
                fields,
                pending,
                grids,
                progress and ranks.main,
                on_batch,
            )
        elif not len(every):
            ranks.say(f"{path}: all {len(samples)} samples are traced already; nothing to trace")
    return path


def load_samples(config: TraceConfig, adapter: VLMAdapter) -> KeyObjectDataset:
    """The samples to trace. By default only the "trace" split, when the dataset has one:
    layers must be chosen on images that the fine-tuning evaluation never sees.
    Descriptions longer than ``config.max_description_tokens`` (or the context) and images
    the model's processor refuses are bad records: refused, or skipped with ``skip_bad``."""
    tokenizer = adapter.tokenizer
    context = getattr(adapter.text_config, "max_position_embeddings", None)
    dataset = load_dataset(
        local_path(config.dataset),
        skip_bad=config.skip_bad,
        count_tokens=lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]),
        max_description_tokens=min(config.max_description_tokens, context or config.max_description_tokens),
        use=adapter,  # an image size the processor refuses is a bad record
    )
    for note in dataset.notes:
        if note.reason.startswith(LARGE_IMAGE):
            print(f"note: {note.message}", file=sys.stderr)
    if config.split == "all":
        return dataset
    if config.split == "auto":
        return dataset.split("trace") if "trace" in dataset.split_counts() else dataset
    return dataset.split(config.split)


def prompt_fields(
    config: TraceConfig, samples: Sequence[Sample], dataset: KeyObjectDataset
) -> list[dict[str, str]]:
    """Each sample's template fields. ``vqa``: the paper's closed-ended question with
    options A-D, the true description and three others drawn from the whole dataset's
    descriptions exactly as `mechhi evaluate` draws them (`evaluate.vqa.sample_options`:
    the same for a sample whatever ``--limit`` selects); the answer slot holds the true
    description, so the traced rows are still the description's tokens."""
    if config.template != "vqa":
        return [{} for _ in samples]

    pool = option_pool(dataset)
    return [{"options": format_options(sample_options(s, pool, seed=config.vqa_seed)[0])} for s in samples]


def pending_samples(path: Path) -> np.ndarray:
    """Samples to trace: those not done, and done ones whose data is lost (said so).

    What `missing_data` finds is repaired first (`store.verify.repair`: a damaged shard
    or ``done`` file is deleted, its samples marked not done), since zarr reads a shard to
    merge a write into it and a damaged one would refuse the retrace. Samples with traced
    data but no ``done`` file are said too: they are traced again. Call with the lock held."""
    lost = missing_data(path)
    if lost:
        print(f"{path}: {describe(lost)}; tracing them again", file=sys.stderr)
        repair(path, lost)
    for key, samples in unflagged(path):
        print(
            f"{path}: {key} is missing, but {samples_text(samples)} have traced data: they count as not done "
            "(a deleted done file, or a kill before they were flagged); tracing them again",
            file=sys.stderr,
        )
    return np.flatnonzero(~done_mask(path))


def _grids(adapter: VLMAdapter, samples: Sequence[Sample]) -> list[Grids]:
    """Every sample's grid per view, needed up front to size the store: from the recorded
    (upright) image size alone, so no image is read here (`VLMAdapter.grid_sizes`)."""
    return [adapter.grid_sizes((s.record.width, s.record.height)) for s in samples]


def _max_grids(grids: Sequence[Grids]) -> Grids:
    """The store's grid size per view: the largest rows and cols over all samples."""
    largest: Grids = {}
    for sample_grids in grids:
        for name, (rows, cols) in sample_grids.items():
            top_rows, top_cols = largest.get(name, (0, 0))
            largest[name] = (max(top_rows, rows), max(top_cols, cols))
    return largest


def _meta(sample: Sample, grids: Grids) -> SampleMeta:
    return SampleMeta(
        image_id=sample.image_id,
        object_id=sample.object_id,
        description=sample.description,
        grids=dict(grids),
    )


def _attrs(config: TraceConfig, model: Any, adapter: VLMAdapter, dataset: KeyObjectDataset) -> dict:
    """The store's provenance (see docs/design.md, "Store schema")."""
    attrs = {
        **provenance(config.model, model),  # model, model_revision, attn_implementation, versions
        "family": adapter.family,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "prompt_template": config.template,
        "prompt": adapter.prompt_text(config.template),
        "dataset": str(DatasetRef.of(config.dataset, dataset.fingerprint)),  # see store.dataset_ref
        "split": dataset.split_name or "all",
        "max_description_tokens": config.max_description_tokens,
        "binarize": asdict(BinarizeRule()),
        "skipped": [asdict(s) for s in dataset.skipped],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if config.template == "vqa":
        attrs["vqa_seed"] = config.vqa_seed
        attrs["vqa_draw"] = VQA_DRAW
    return attrs


# ---------------------------------------------------------- one batch: forward, write (prepare: trace.loader)
def forward(
    tracer: AttentionTracer, batch: PreparedBatch, number: int, indices: Sequence[int], batch_size: int
) -> np.ndarray:
    """(B, L, H, V) attention of the description rows on the visual tokens; an allocation
    failure becomes `TraceOutOfMemory` naming the batch and what to change."""
    try:
        return tracer.trace(batch)
    except (torch.OutOfMemoryError, MemoryError) as error:
        raise _out_of_memory(batch, number, indices, batch_size, error) from None
    except RuntimeError as error:  # the CPU allocator's failure is a plain RuntimeError
        if "can't allocate memory" not in str(error) and "out of memory" not in str(error).lower():
            raise
        raise _out_of_memory(batch, number, indices, batch_size, error) from None


def _out_of_memory(
    batch: PreparedBatch, number: int, indices: Sequence[int], batch_size: int, error: BaseException
) -> TraceOutOfMemory:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    longest = max(len(layout.query_positions) for layout in batch.layouts)
    tokens = int(batch.inputs["input_ids"].shape[-1])
    smaller = (
        "--batch-size 1 or a lower --max-description-tokens"
        if batch_size == 1
        else f"a smaller --batch-size (this run: {batch_size})"
    )
    reason = " ".join(str(error).split())[:120]
    return TraceOutOfMemory(
        f"out of memory in batch {number + 1} (samples {min(indices)}-{max(indices)}: "
        f"{len(indices)} samples of up to {tokens} tokens, descriptions up to {longest}): "
        f"rerun with {smaller}; the traced batches are kept ({reason})"
    )


def write(
    path: Path,
    loaded: LoadedBatch,
    cube: np.ndarray,
    grids: Sequence[Grids],
    max_grid: Grids,
    maps: bool,
    opened: Any = None,
) -> None:
    """Each sample's attention grids, mask coverage and IoU, padded to the store's grids,
    into the batch's region; the samples are flagged done after the write. ``grids``: the
    grids the store was sized with, by sample index; a processed sample whose grid differs
    is an error (an adapter's `grid_sizes` rule that does not match its processor).
    ``opened``: the store, opened once for all batches (`write_batch`)."""
    rule = BinarizeRule()
    attention: dict[str, list[np.ndarray]] = {}
    masks: dict[str, list[np.ndarray]] = {}
    ious = []
    for index, layout, coverage, values in zip(loaded.indices, loaded.batch.layouts, loaded.coverage, cube):
        made = {v.name: v.grid for v in layout.views}
        if made != grids[index]:
            raise AdapterError(
                f"sample {index}: the processor made grids {made}, but the store was sized for "
                f"{grids[index]} (the adapter's grid_sizes rule is wrong for this processor)"
            )
        view_grids = layout.split_views(values[..., : sum(len(v.positions) for v in layout.views)])
        ious.append(sample_iou(view_grids, coverage, rule))
        for view, grid in view_grids.items():
            attention.setdefault(view, []).append(pad_grid(grid, *max_grid[view]))
            masks.setdefault(view, []).append(pad_grid(coverage[view], *max_grid[view]))
    write_batch(
        path,
        loaded.indices,
        attention={v: np.stack(a) for v, a in attention.items()} if maps else None,
        mask={v: np.stack(m) for v, m in masks.items()},
        iou=np.stack(ious),
        opened=opened,
    )


def _trace_pending(
    path: Path,
    config: TraceConfig,
    model: Any,
    adapter: VLMAdapter,
    samples: Sequence[Sample],
    fields: Sequence[dict[str, str]],
    pending: np.ndarray,
    grids: Sequence[Grids],
    progress: bool,
    on_batch: BatchCallback | None,
) -> None:
    """Pending samples in length-bucketed batches: prepared by the loader's workers,
    traced here, written by the writer thread (which also advances the bar and runs
    ``on_batch`` after each batch is flagged done)."""
    tracer = AttentionTracer(model, adapter)
    batches = bucketed_batches(
        pending,
        sequence_lengths(adapter, samples, fields, grids),
        config.batch_size,
        loader.BUCKET_TOKENS,
        shard_samples(path),
    )
    prepared = batch_loader(samples, fields, adapter, config.template, batches, config.workers(tracer.device))
    max_grid = _max_grids(grids)
    opened = open_store(path)  # the schema, to check each batch against without reopening
    with progress_bar("tracing", len(samples), show=progress, completed=len(samples) - len(pending)) as bar:

        def write_done(job: tuple[int, LoadedBatch, np.ndarray]) -> None:
            number, loaded, cube = job
            write(path, loaded, cube, grids, max_grid, config.maps, opened)
            bar.advance(len(loaded.indices))
            if on_batch is not None:
                on_batch(number, loaded.indices)

        with BackgroundWriter(write_done, depth=2) as writer:
            for number, loaded in enumerate(prepared):
                loaded.checked()
                writer.reserve()  # at most two batches of cubes: one written, this one
                cube = forward(tracer, loaded.batch, number, loaded.indices, config.batch_size)
                writer.submit((number, loaded, cube))
