"""Trace a dataset into a store: the `mechhi trace` job.

The job is resumable by construction: the store is created once with every sample's
slot, each batch is written as one region and flagged done only after the write, and a
rerun of the same command traces only the samples not yet done. Nothing already flagged
is recomputed or lost.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..bundled import BUNDLED_DATASET, BUNDLED_MODEL, DEFAULT_STORE_DIR
from ..data.format import KeyObjectDataset, Sample, load_dataset
from ..models import SampleLayout, VLMAdapter
from ..models.loading import load
from ..store import SampleMeta, create_store, done_mask, pad_grid, write_batch
from .attention import AttentionTracer


@dataclass(frozen=True)
class TraceConfig:
    """Defaults of `mechhi trace`: the bundled toy model on the bundled synthetic dataset."""

    model: str = str(BUNDLED_MODEL)  # HF id or local directory
    dataset: str = str(BUNDLED_DATASET)  # directory in mechhi's dataset format
    store: str | None = None  # default: stores/<dataset name>.zarr ("toy" for the bundled one)
    limit: int | None = None  # trace only the first N samples
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"
    maps: bool = True  # False: keep only masks and IoU, not the attention cube
    template: str = "caption"
    split: str = "auto"  # "auto": the "trace" split if the dataset has one, else all; "all"; or a split name
    skip_bad: bool = False  # skip invalid records (recorded in the store) instead of failing
    revision: str | None = None

    def store_path(self) -> Path:
        if self.store:
            return Path(self.store)
        name = "toy" if Path(self.dataset) == BUNDLED_DATASET else Path(self.dataset).name
        return DEFAULT_STORE_DIR / f"{name}.zarr"


BatchCallback = Callable[[int, Sequence[int]], None]


def trace_dataset(
    config: TraceConfig,
    *,
    progress: bool = True,
    on_batch: BatchCallback | None = None,
    loaded: tuple[Any, VLMAdapter] | None = None,
) -> Path:
    """Trace every pending sample of the dataset into the store; return the store path.

    ``on_batch(batch_number, sample_indices)`` runs after each batch is flagged done
    (tests use it to simulate a kill). ``loaded`` passes an already loaded
    (model, adapter) pair instead of loading ``config.model``.
    """
    model, adapter = loaded or load(
        config.model, device=config.device, dtype=config.dtype, revision=config.revision
    )
    dataset = load_samples(config, adapter)
    samples = dataset.samples[: config.limit] if config.limit else dataset.samples
    if not samples:
        raise ValueError(f"no samples to trace in {config.dataset} (split {config.split!r})")
    layouts = _layouts(adapter, samples, config.template, config.batch_size)
    path = config.store_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    create_store(
        path,
        samples=[_meta(s, lay) for s, lay in zip(samples, layouts)],
        n_layers=adapter.n_layers,
        n_heads=adapter.n_heads,
        attrs=_attrs(config, model, adapter, dataset),
        maps=config.maps,
    )
    pending = np.flatnonzero(~done_mask(path))
    if len(pending):
        _trace_pending(path, config, model, adapter, samples, pending, _max_grids(layouts), progress, on_batch)
    return path


def load_samples(config: TraceConfig, adapter: VLMAdapter) -> KeyObjectDataset:
    """The samples to trace. By default only the "trace" split, when the dataset has one:
    layers must be chosen on images that the fine-tuning evaluation never sees."""
    tokenizer = adapter.tokenizer
    context = getattr(adapter.text_config, "max_position_embeddings", None)
    dataset = load_dataset(
        config.dataset,
        skip_bad=config.skip_bad,
        count_tokens=lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]),
        max_description_tokens=context,
    )
    if config.split == "all":
        return dataset
    if config.split == "auto":
        return dataset.split("trace") if "trace" in dataset.split_counts() else dataset
    return dataset.split(config.split)


def _layouts(
    adapter: VLMAdapter, samples: Sequence[Sample], template: str, batch_size: int
) -> list[SampleLayout]:
    """Every sample's token layout, needed up front to size the store's grids."""
    layouts: list[SampleLayout] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = adapter.prepare([s.image() for s in chunk], [s.description for s in chunk], template=template)
        layouts.extend(batch.layouts)
    return layouts


def _max_grids(layouts: Sequence[SampleLayout]) -> dict[str, tuple[int, int]]:
    """The store's grid size per view: the largest rows and cols over all samples."""
    grids: dict[str, tuple[int, int]] = {}
    for layout in layouts:
        for v in layout.views:
            rows, cols = grids.get(v.name, (0, 0))
            grids[v.name] = (max(rows, v.grid[0]), max(cols, v.grid[1]))
    return grids


def _meta(sample: Sample, layout: SampleLayout) -> SampleMeta:
    return SampleMeta(
        image_id=sample.image_id,
        object_id=sample.object_id,
        description=sample.description,
        grids={v.name: v.grid for v in layout.views},
    )


def _attrs(config: TraceConfig, model: Any, adapter: VLMAdapter, dataset: KeyObjectDataset) -> dict:
    from probes.head_impact import BinarizeRule

    return {
        "mechhi_version": __version__,
        "model": config.model,
        "model_revision": config.revision or getattr(model.config, "_commit_hash", None) or "",
        "family": adapter.family,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "prompt_template": config.template,
        "prompt": repr(adapter.templates[config.template]),
        "dataset": f"{Path(config.dataset).resolve()}#{dataset.fingerprint}",
        "split": dataset.split_name or "all",
        "binarize": asdict(BinarizeRule()),
        "skipped": [asdict(s) for s in dataset.skipped],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _trace_pending(
    path: Path,
    config: TraceConfig,
    model: Any,
    adapter: VLMAdapter,
    samples: Sequence[Sample],
    pending: np.ndarray,
    max_grid: dict[str, tuple[int, int]],
    progress: bool,
    on_batch: BatchCallback | None,
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from probes.head_impact import BinarizeRule, sample_iou
    tracer = AttentionTracer(model, adapter)
    rule = BinarizeRule()
    columns = (TextColumn("tracing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("trace", total=len(samples), completed=len(samples) - len(pending))
        for number, start in enumerate(range(0, len(pending), config.batch_size)):
            indices = [int(i) for i in pending[start : start + config.batch_size]]
            chunk = [samples[i] for i in indices]
            batch = adapter.prepare([s.image() for s in chunk], [s.description for s in chunk], template=config.template)
            cube = tracer.trace(batch)  # (B, L, H, V)
            attention: dict[str, list[np.ndarray]] = {}
            masks: dict[str, list[np.ndarray]] = {}
            ious = []
            for sample, layout, values in zip(chunk, batch.layouts, cube):
                grids = layout.split_views(values[..., : sum(len(v.positions) for v in layout.views)])
                coverage = layout.coverage(sample.mask())
                ious.append(sample_iou(grids, coverage, rule))
                for view, grid in grids.items():
                    attention.setdefault(view, []).append(pad_grid(grid, *max_grid[view]))
                    masks.setdefault(view, []).append(pad_grid(coverage[view], *max_grid[view]))
            write_batch(
                path,
                indices,
                attention={v: np.stack(a) for v, a in attention.items()} if config.maps else None,
                mask={v: np.stack(m) for v, m in masks.items()},
                iou=np.stack(ious),
            )
            bar.advance(task, len(indices))
            if on_batch is not None:
                on_batch(number, indices)
