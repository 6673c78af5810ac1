"""`mechhi knockout`: which attention edges carry the image to the answer, layer window by
layer window.

For each group pair (``source->target``: information may no longer flow from the source
group's positions to the target group's, i.e. the target's rows may not attend the source's
columns; `mechhi.flow.groups`) and each window of consecutive layers, every
evaluation sample is run with those edges closed in every head (or ``heads``) of the window
(`mechhi.flow.knockout`), and compared with the same sample run intact:

- ``answer_logprob``: log-probability of the description, teacher forced (sum over its
  tokens), under the caption template;
- ``vqa_accuracy`` and ``ans_prob``: the closed four-option question's accuracy and the
  true letter's renormalised probability, under the VQA template.

Each change is a paired difference over the same samples with its standard error
(``mechhi.intervene.effects``). Every (pair, window)'s per-sample values are cached under
``out`` keyed by what they depend on, so a rerun computes nothing and loads no model.

Result (JSON-able): ``config``, ``model``, ``store``, ``dataset``, ``n_samples``,
``n_layers``, ``windows`` ([[first, last], ...]), ``pairs``, ``metrics``, ``intact``
({metric: {mean, se, n}}), ``rows``: one per (pair, window): ``pair``, ``window``,
``layers``, ``metrics``, ``change`` ({metric: {mean, se, n}}), ``cached``; ``seconds``.
`as_dataset` turns it into a labelled xarray Dataset (pair x window).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from mechhi.evaluate.metrics import letter_ids, vqa_batches, vqa_from_logits
from mechhi.finetune.loss import predictions_from_logits
from mechhi.flow.groups import check_group, token_groups
from mechhi.flow.knockout import Knockout, KnockoutRunner, windows
from mechhi.intervene.ablate import EvalData
from mechhi.intervene.effects import paired_change, summary
from mechhi.intervene.session import Session, default_store
from mechhi.jsonfiles import write_json
from mechhi.progress import tracked
from mechhi.result_cache import ResultCache

# The pairs Zhang et al. (CVPR 2025) block in a VLM, plus the object / background split of the image.
DEFAULT_PAIRS = (
    "image->last",
    "question->last",
    "image->question",
    "object->last",
    "background->last",
    "image->description",
)
METRICS = ("answer_logprob", "vqa_accuracy", "ans_prob")
_VALUES = {"answer_logprob": "answer_logprob", "vqa_accuracy": "vqa_correct", "ans_prob": "ans_prob"}


@dataclass(frozen=True)
class KnockoutConfig:
    """Defaults of `mechhi knockout`: the bundled toy's demo store on held-out toy scenes."""

    store: str | None = None  # the model (and its layers) come from the store
    pairs: tuple[str, ...] = DEFAULT_PAIRS  # "source->target" group names
    window: int | None = None  # layers per window (default: a sixth of the depth, rounded up)
    stride: int | None = None  # default: the window (non-overlapping)
    heads: tuple[int, ...] | None = None  # default: every head of each window's layers
    dataset: str | None = None  # evaluation data (default: held-out toy-world scenes)
    split: str = "test"
    limit: int | None = 50
    vqa_seed: int = 0
    batch_size: int = 16
    out: str = "experiments/knockout"
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        for pair in self.pairs:
            parse_pair(pair)
        if not self.pairs:
            raise ValueError("--pairs: at least one source->target pair")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit {self.limit}: must be at least 1")


def parse_pair(pair: str) -> tuple[str, str]:
    """ "image->last" -> ("image", "last"), both checked against the group names."""
    source, arrow, target = pair.partition("->")
    if not arrow or not source or not target:
        raise ValueError(f"knockout pair {pair!r}: write it as source->target, e.g. image->last")
    views = ("image", "global")
    return check_group(source.strip(), views=views), check_group(target.strip(), views=views)


def _samples_values(
    runner: KnockoutRunner, data: EvalData, knockout: Knockout | None, batch_size: int, letters: list[int]
) -> dict[str, list[float]]:
    """Per-sample answer log-prob, VQA correctness and AnsProb under ``knockout``."""
    adapter = runner.adapter
    samples, images = data.samples, data.images
    masks = [s.mask() for s in samples]
    out: dict[str, list[float]] = {"answer_logprob": [], "vqa_correct": [], "ans_prob": []}
    for start in range(0, len(samples), batch_size):
        part = slice(start, start + batch_size)
        batch = adapter.prepare(images[part], [s.description for s in samples[part]], template="caption")
        groups = [token_groups(layout, m) for layout, m in zip(batch.layouts, masks[part])]
        for logp, ids in predictions_from_logits(runner.logits(batch, groups, knockout), batch):
            out["answer_logprob"].append(float(logp.gather(-1, ids[:, None]).sum()))
    items = data.items
    for start, batch in zip(
        range(0, len(items), batch_size), vqa_batches(adapter, items, batch_size=batch_size)
    ):
        groups = [
            token_groups(layout, m) for layout, m in zip(batch.layouts, masks[start : start + batch_size])
        ]
        answers = [it.answer for it in items[start : start + batch_size]]
        correct, probability = vqa_from_logits(
            runner.logits(batch, groups, knockout), batch, letters, answers
        )
        out["vqa_correct"].extend(correct)
        out["ans_prob"].extend(probability)
    return out


def plan(config: KnockoutConfig, n_layers: int) -> list[tuple[str, tuple[int, ...]]]:
    width = config.window or max(1, math.ceil(n_layers / 6))
    return [(pair, layers) for pair in config.pairs for layers in windows(n_layers, width, config.stride)]


def run_knockout(
    config: KnockoutConfig = KnockoutConfig(), *, progress: bool = True, loaded: tuple[Any, Any] | None = None
) -> dict[str, Any]:
    """Every (pair, window) knockout against the intact model; see the module doc."""
    began = time.time()
    session = Session(
        Path(config.store) if config.store else default_store(),
        config.model,
        config.device,
        config.dtype,
        loaded,
        progress,
    )
    n_layers, n_heads = session.ds.sizes["layer"], session.ds.sizes["head"]
    bad = [h for h in config.heads or () if not 0 <= h < n_heads]
    if bad:
        raise ValueError(f"--heads {bad}: the store's model has heads 0..{n_heads - 1}")
    setups = plan(config, n_layers)
    data = EvalData(config.dataset, config.split, config.limit, config.vqa_seed, progress)
    cache = ResultCache(Path(config.out) / "cache")
    runner: list[KnockoutRunner] = []

    def values_of(knockout: Knockout | None) -> tuple[dict[str, list[float]], bool]:
        fields = {
            "model": session.model_name,
            "numerics": session.numerics,
            **data.fields(),
            "knockout": None if knockout is None else asdict(knockout),
            "batch_size": config.batch_size,
        }

        def compute() -> dict[str, list[float]]:
            if not runner:
                runner.append(KnockoutRunner(*session.model))
            return _samples_values(runner[0], data, knockout, config.batch_size, letter_ids(session.model[1]))

        return cache.get_or_compute("knockout", fields, compute)

    intact, _ = values_of(None)
    rows = []
    for pair, layers in tracked(setups, "knocking out", show=progress):
        source, target = parse_pair(pair)
        values, cached = values_of(Knockout(source, target, layers, config.heads))
        rows.append(
            {
                "pair": pair,
                "window": [layers[0], layers[-1]],
                "layers": list(layers),
                "metrics": {m: summary(values[_VALUES[m]]) for m in METRICS},
                "change": {m: paired_change(values[_VALUES[m]], intact[_VALUES[m]]) for m in METRICS},
                "cached": cached,
            }
        )
    spans = sorted({tuple(r["window"]) for r in rows})
    report = {
        "config": asdict(config),
        "model": session.model_name,
        "store": str(session.store),
        "dataset": str(data.directory),
        "n_samples": len(data.samples),
        "n_layers": n_layers,
        "windows": [list(w) for w in spans],
        "pairs": list(config.pairs),
        "metrics": list(METRICS),
        "intact": {m: summary(intact[_VALUES[m]]) for m in METRICS},
        "rows": rows,
        "seconds": time.time() - began,
    }
    return write_json(Path(config.out) / "knockout.json", report)


def as_dataset(report: dict[str, Any]) -> xr.Dataset:
    """The report's changes as a labelled Dataset: ``<metric>`` and ``<metric>_se`` over
    (pair, window); ``window`` carries ``first``/``last`` layer and ``depth`` (the window
    centre's relative depth) coordinates."""
    pairs, spans = report["pairs"], [tuple(w) for w in report["windows"]]
    data: dict[str, Any] = {}
    for metric in report["metrics"]:
        for suffix, key in (("", "mean"), ("_se", "se")):
            grid = np.full((len(pairs), len(spans)), np.nan)
            for row in report["rows"]:
                value = row["change"][metric][key]
                grid[pairs.index(row["pair"]), spans.index(tuple(row["window"]))] = (
                    np.nan if value is None else value
                )
            data[metric + suffix] = (("pair", "window"), grid)
    depth = [(a + b) / 2 / max(report["n_layers"] - 1, 1) for a, b in spans]
    coords = {
        "pair": pairs,
        "window": [f"{a}-{b}" for a, b in spans],
        "first": ("window", [a for a, _ in spans]),
        "last": ("window", [b for _, b in spans]),
        "depth": ("window", depth),
    }
    return xr.Dataset(data, coords=coords, attrs={"model": report["model"], "n_samples": report["n_samples"]})
