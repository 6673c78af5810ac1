"""`mechhi ablate`: the causal test of a head ranking.

Head Impact says which heads look at the described object; if that is what the model
uses, removing those heads should hurt its captions and answers more than removing
heads picked blind. Neither the Head Impact paper nor mechhi's fine-tuning experiment
tests that; this does. From one store's probe scores (Head Impact, attention-mass lift,
Head Pursuit or the logit lens) it ablates, one setup at a time:

- the probe's top N heads and its bottom N;
- random sets with the same heads per layer as the top N (``matched``) and with the
  same heads per depth bin (``depth``), one per seed (``mechhi.scoring.head_sets``);

and measures, on the same samples as the unablated model, the description perplexity
(teacher forced) and the closed four-option VQA accuracy and AnsProb of
``mechhi.evaluate.metrics``, each change with its paired standard error
(``mechhi.intervene.effects``). Ablation is zero (the head's output set to 0) or mean
(set to its mean over the store's samples, the default). Every setup's per-sample
results are cached under ``out``, keyed by everything they depend on, so a rerun
computes nothing and loads no model.

Result (JSON-able dict):

- ``config``: the settings; ``model``, ``store``, ``dataset``, ``split``, ``n_samples``;
  ``probe``, ``n_heads``, ``mode``, ``seeds``; ``metrics``: the metric names;
- ``setups``: one per setup, in order: ``name``, ``kind`` (``unablated`` | ``top`` |
  ``bottom`` | ``matched`` | ``depth``), ``seed`` (None for the first three), ``heads``
  ([[layer, head], ...]), ``per_layer`` ({layer: count}), ``overlap_with_top``,
  ``metrics`` ({metric: {mean, se, n}}), ``change`` ({metric: {mean, se, n}}, vs
  unablated), ``cached`` (bool);
- ``summary``: one row per (setup group, metric): ``group`` (``top`` | ``bottom`` |
  ``matched`` | ``depth``), ``metric``, ``change`` and ``se`` (the probe sets'; for a
  random group the mean over seeds of the change and of its SE), and for the random
  groups ``seeds``: the spread of the per-seed changes (mean, sd, median, q25, q75,
  min, max, n_seeds, n_distinct sets, as_extreme: share of seeds whose change goes at
  least as far as the top set's, in its direction);
- ``seconds``: wall time of this run (cached setups cost nothing).

>>> report = run_ablate(AblateConfig(n_heads=8))          # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from mechhi.data.splits import load_split
from mechhi.data.vqa import VQA_DRAW, option_pool, vqa_items
from mechhi.evaluate.metrics import answer_scores, vqa_scores
from mechhi.intervene.effects import paired_change, seed_spread, summary
from mechhi.intervene.heads import Head
from mechhi.intervene.heldout import ensure_heldout_dataset
from mechhi.intervene.session import MODES, Session, default_store
from mechhi.jsonfiles import write_json
from mechhi.models import VLMAdapter
from mechhi.progress import tracked
from mechhi.result_cache import ResultCache
from mechhi.scoring.head_sets import CONTROLS, bottom_heads, overlap, per_layer, random_control, top_heads
from mechhi.scoring.probe_scores import ModelProbeSettings, probe_scores
from probes.registry import get_probe

# metric -> (per-sample values it is computed from, transform of their mean)
METRICS = {
    "perplexity": ("nll", "exp"),
    "vqa_accuracy": ("vqa_correct", "identity"),
    "ans_prob": ("ans_prob", "identity"),
}


@dataclass(frozen=True)
class AblateConfig:
    """Defaults of `mechhi ablate`: the bundled toy model's demo store, about 2-3 minutes on 2 CPU cores."""

    store: str | None = None  # default: where `mechhi trace` writes by default
    probe: str = "head-impact"  # any registered probe (probes.registry)
    n_heads: int = 8  # heads per ablated set: a sixth of the toy's 48
    mode: str = "mean"  # mean: replace by the head's mean output over the store's samples; zero
    controls: tuple[str, ...] = CONTROLS  # random sets: matched per layer, matched per depth bin
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # one random set of each control per seed
    bins: int = 3  # depth bins of the depth-matched control
    dataset: str | None = None  # evaluation data (default: held-out toy-world scenes, built on first use)
    split: str = "test"
    limit: int | None = 100  # evaluation samples (None: the whole split)
    vqa_seed: int = 0  # with each sample's id, draws its distractor options (as `evaluate` and `trace` do)
    words: tuple[
        str, ...
    ] = ()  # concept of the probes that need words (pursuit, logit-lens): required for them
    template: str = "caption"
    batch_size: int = 16
    out: str = "experiments/ablate"  # cache of finished setups and the result JSON
    model: str | None = None  # default: the store's model
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if "words" in get_probe(self.probe).needs and len(self.words) < 2:
            raise ValueError(f"--probe {self.probe} needs a concept: --words with at least two words")
        if self.mode not in MODES:
            raise ValueError(f"--mode {self.mode!r}: choose from {', '.join(MODES)}")
        unknown = sorted(set(self.controls) - set(CONTROLS))
        if unknown:
            raise ValueError(f"unknown random controls {unknown}; choose from {', '.join(CONTROLS)}")
        if self.controls and not self.seeds:
            raise ValueError("random controls need at least one seed")
        if self.n_heads < 1:
            raise ValueError(f"--n-heads {self.n_heads}: must be at least 1")


@dataclass(frozen=True)
class Setup:
    name: str
    kind: str
    heads: tuple[Head, ...]
    seed: int | None = None


class EvalData:
    """The evaluation samples, their images and four-option questions, loaded once."""

    def __init__(
        self, dataset: str | None, split: str, limit: int | None, vqa_seed: int, progress: bool
    ) -> None:
        self.directory = Path(dataset) if dataset else ensure_heldout_dataset(progress=progress)
        self.split = load_split(self.directory, split)
        self.samples = self.split.samples[:limit] if limit else list(self.split.samples)
        self.vqa_seed = vqa_seed

    @cached_property
    def images(self) -> list[Any]:
        return [s.image() for s in self.samples]

    @cached_property
    def items(self) -> list[Any]:
        return vqa_items(self.samples, self.images, seed=self.vqa_seed, pool=option_pool(self.split))

    def fields(self) -> dict[str, Any]:
        return {
            "data": self.split.fingerprint,
            "split": self.split.split_name,
            "n": len(self.samples),
            "vqa_seed": self.vqa_seed,
            "vqa_draw": VQA_DRAW,
        }


def plan(config: AblateConfig, scores: xr.DataArray, n_layers: int, n_heads: int) -> list[Setup]:
    """Unablated, top-N, bottom-N, then each control for each seed (matched to the top-N)."""
    n = config.n_heads
    top = top_heads(scores, n)
    setups = [
        Setup("unablated", "unablated", ()),
        Setup(f"top-{n}", "top", top),
        Setup(f"bottom-{n}", "bottom", bottom_heads(scores, n)),
    ]
    for kind in config.controls:
        for seed in config.seeds:
            heads = random_control(kind, top, n_layers=n_layers, n_heads=n_heads, seed=seed, bins=config.bins)
            setups.append(Setup(f"{kind} (seed {seed})", kind, heads, seed))
    return setups


def probe_head_scores(session: Session, config: AblateConfig, cache: ResultCache) -> xr.DataArray:
    """The probe's (layer, head) scores for the store, cached (pursuit and the logit lens run the model)."""
    settings = ModelProbeSettings(words=config.words, device=config.device, dtype=config.dtype)
    fields = {
        **session.store_fields(),
        "probe": config.probe,
        "settings": asdict(settings),
        "model": session.model_name,
        "numerics": session.numerics,
    }

    def compute() -> list:
        loaded = session.model if get_probe(config.probe).needs_model else None
        result = probe_scores(
            session.ds, [config.probe], settings=settings, loaded=loaded, progress=session.progress
        )
        return result[get_probe(config.probe).variable].values.tolist()

    values, _ = cache.get_or_compute("scores", fields, compute)
    coords = {"layer": session.ds["layer"].values, "head": session.ds["head"].values}
    return xr.DataArray(
        np.asarray(values, dtype=float), dims=("layer", "head"), coords=coords, name=config.probe
    )


def measure(
    model: Any, adapter: VLMAdapter, data: EvalData, *, template: str, batch_size: int
) -> dict[str, list[float]]:
    """Per-sample answer NLL, VQA correctness and AnsProb of ``model`` (plain or edited)."""
    nll, _ = answer_scores(
        model,
        adapter,
        data.images,
        [s.description for s in data.samples],
        template=template,
        batch_size=batch_size,
    )
    correct, probability = vqa_scores(model, adapter, data.items, batch_size=batch_size)
    return {"nll": nll.tolist(), "vqa_correct": correct.tolist(), "ans_prob": probability.tolist()}


def _setup_values(
    session: Session, config: AblateConfig, data: EvalData, cache: ResultCache, setup: Setup
) -> tuple[dict[str, list[float]], bool]:
    mode = config.mode if setup.heads else "none"
    fields = {
        "model": session.model_name,
        "numerics": session.numerics,
        **data.fields(),
        "template": config.template,
        "mode": mode,
        "heads": [list(h) for h in setup.heads],
        **session.reference_fields(mode),
    }

    def compute() -> dict[str, list[float]]:
        adapter = session.model[1]
        with session.editor.edited(session.ablation(setup.heads, config.mode)) as edited:
            return measure(edited, adapter, data, template=config.template, batch_size=config.batch_size)

    return cache.get_or_compute("setup", fields, compute)


def _entry(
    setup: Setup,
    values: dict[str, list[float]],
    base: dict[str, list[float]],
    top: tuple[Head, ...],
    cached: bool,
) -> dict[str, Any]:
    return {
        "name": setup.name,
        "kind": setup.kind,
        "seed": setup.seed,
        "heads": [list(h) for h in setup.heads],
        "per_layer": per_layer(setup.heads),
        "overlap_with_top": overlap(setup.heads, top) if setup.heads else None,
        "metrics": {m: summary(values[v], t) for m, (v, t) in METRICS.items()},
        "change": {m: paired_change(values[v], base[v], t) for m, (v, t) in METRICS.items()},
        "cached": cached,
    }


def summarise(entries: list[dict[str, Any]], controls: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per (group, metric): the probe sets' changes, the random groups' spread over seeds."""
    rows = []
    top = next(e for e in entries if e["kind"] == "top")
    for group in ("top", "bottom", *controls):
        members = [e for e in entries if e["kind"] == group]
        for metric in METRICS:
            changes = [e["change"][metric]["mean"] for e in members]
            row = {
                "group": group,
                "metric": metric,
                "change": float(np.mean(changes)),
                "se": float(np.mean([e["change"][metric]["se"] for e in members])),
            }
            if group in controls:
                spread = seed_spread(changes, top["change"][metric]["mean"])
                spread["n_distinct"] = len({tuple(map(tuple, e["heads"])) for e in members})
                row["seeds"] = spread
            rows.append(row)
    return rows


def run_ablate(
    config: AblateConfig = AblateConfig(),
    *,
    progress: bool = True,
    loaded: tuple[Any, VLMAdapter] | None = None,
) -> dict[str, Any]:
    """Ablate the probe's top and bottom heads and the random controls; see the module doc."""
    began = time.time()
    session = Session(
        Path(config.store) if config.store else default_store(),
        config.model,
        config.device,
        config.dtype,
        loaded,
        progress,
    )
    cache = ResultCache(Path(config.out) / "cache")
    scores = probe_head_scores(session, config, cache)
    setups = plan(config, scores, session.ds.sizes["layer"], session.ds.sizes["head"])
    data = EvalData(config.dataset, config.split, config.limit, config.vqa_seed, progress)
    results = [
        _setup_values(session, config, data, cache, s)
        for s in tracked(setups, "ablating", show=progress, transient=True)
    ]
    base, top = results[0][0], setups[1].heads
    entries = [_entry(s, values, base, top, cached) for s, (values, cached) in zip(setups, results)]
    report = {
        "config": asdict(config),
        "model": session.model_name,
        "store": str(session.store),
        "dataset": str(data.directory),
        "split": config.split,
        "n_samples": len(data.samples),
        "probe": config.probe,
        "n_heads": config.n_heads,
        "mode": config.mode,
        "seeds": list(config.seeds),
        "metrics": list(METRICS),
        "setups": entries,
        "summary": summarise(entries, config.controls),
        "seconds": time.time() - began,
    }
    return write_json(Path(config.out) / "ablate.json", report)
