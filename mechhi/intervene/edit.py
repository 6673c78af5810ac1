"""`mechhi edit`: Head Pursuit's editing experiment (Basile et al. 2025, section 5).

Head Pursuit ranks heads by how much of their residual-stream write a concept's
unembedding directions explain (SOMP, ``probes.head_pursuit``). Its causal claim: scaling
the outputs of the few top heads for a concept by alpha, at every position, moves that
concept in the model's output (alpha = -1 suppresses it, alpha > 1 enhances it) while
another concept holds, and random head sets with the same heads per layer do much less.

Here: SOMP on the store's samples ranks every head for the concept's words; the top K
are scaled by alpha; greedy captions (``mechhi.evaluate.generate``) of held-out images
are generated with no edit, with the top-K edit, and with the matched random sets (one
per seed); in each caption the concept's words and the control concept's words are
counted. Reported against the unedited captions of the same images: the change in words
per caption (paired SE) and the ratio to the unedited count (delta-method SE), for the
concept and the control, and the random sets' spread over seeds. Captions are cached
per setup under ``out``.

The frequency of a concept's words is what Head Pursuit measures; it can only fall where
the language lets a caption drop the word. The toy world's captions are always "a
<colour> <shape>" phrases, so there colour and shape counts move together with the
number of objects named, and what an edit changes is *which* word is said: hence the
``_correct`` counts and the ``_precision`` shares (right words over all the concept's
words said) beside the frequencies.

Result (JSON-able dict):

- ``config``; ``model``, ``store``, ``dataset``, ``n_images``, ``concept`` / ``words``,
  ``control`` / ``control_words``, ``k``, ``alpha``, ``seeds``;
- ``ranking``: the top heads by SOMP, [{layer, head, explained}, ...] (2K of them);
- ``setups``: ``name``, ``kind`` (``unedited`` | ``top`` | ``matched``), ``seed``,
  ``heads``, ``per_layer``, ``overlap_with_top``, ``captions`` (the first few, with the
  image id), per measure (``concept`` / ``control``: the concept's / control's words per
  caption; ``concept_correct`` / ``control_correct``: those of them the image bears out,
  i.e. found in its caption or object descriptions; ``words``: caption length)
  ``metrics`` {mean, se, n}, ``change`` {mean, se, n} and ``ratio`` {mean, se, n}
  against unedited; the same keys for ``concept_precision`` / ``control_precision``, the
  share of all the captions' concept (control) words that are right (its ``ratio`` has
  no SE); ``cached``;
- ``summary``: one row per (group, measure): ``group`` (``top`` | ``matched``),
  ``measure``, ``change``, ``ratio`` and their SEs (mean over seeds for ``matched``),
  and for ``matched`` ``seeds``: the spread over seeds (mean, sd, median, q25, q75, min,
  max, n_seeds, n_distinct) of the ratios (counts) or changes (precisions), ``of`` says
  which, and ``as_extreme``: the share of seeds at least as far from no effect (ratio 1,
  change 0) as the top set, in its direction;
- ``seconds``.

>>> report = run_edit(EditConfig(concept="colour", alpha=-1.0))      # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from mechhi.data.splits import load_split
from mechhi.data.synthetic import COLOURS, WorldConfig
from mechhi.evaluate.generate import generate_captions
from mechhi.intervene.effects import paired_change, paired_ratio, ratio_change, seed_spread, summary
from mechhi.intervene.heads import Head, HeadEdit
from mechhi.intervene.heldout import ensure_heldout_dataset
from mechhi.intervene.session import Session, default_store
from mechhi.jsonfiles import write_json
from mechhi.models import VLMAdapter
from mechhi.progress import tracked
from mechhi.result_cache import ResultCache
from mechhi.scoring.head_sets import overlap, per_layer, random_matched, top_heads
from mechhi.scoring.probe_scores import ModelProbeSettings, probe_scores

# The toy world's concepts: its colour words, and the shapes its scenes draw.
CONCEPTS = {"colour": tuple(COLOURS), "shape": WorldConfig().shapes}
# Per caption: the concept's words, those of them the image bears out, the same for the
# control, and the caption's length in words.
MEASURES = ("concept", "concept_correct", "control", "control_correct", "words")
# Over all captions of a setup: the share of the concept's (control's) words that are right.
PRECISIONS = {
    "concept_precision": ("concept_correct", "concept"),
    "control_precision": ("control_correct", "control"),
}
SHOWN_CAPTIONS = 5


@dataclass(frozen=True)
class EditConfig:
    """Defaults of `mechhi edit`: suppress the toy's colour words, shapes as the control;
    about two minutes on 2 CPU cores."""

    store: str | None = None  # default: where `mechhi trace` writes by default
    concept: str = "colour"  # a named word set (colour | shape); the other one is the control
    words: tuple[str, ...] | None = None  # the concept's words instead of a named set
    control_words: tuple[str, ...] | None = None  # the control's words: required with ``words``
    k: int = 4  # heads edited: the top K by SOMP (Head Pursuit edits about 1-3% of a model's heads)
    alpha: float = -1.0  # -1 suppresses, > 1 enhances, 0 ablates
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # one matched random set per seed
    images: int = 50  # held-out images captioned per setup
    max_new_tokens: int = 16
    pursuit_k: int = 3  # SOMP steps when ranking (at most the number of words)
    positions: str = "image"  # average each head's write over the image tokens
    dataset: str | None = None  # images to caption (default: held-out toy-world scenes, built on first use)
    split: str = "test"
    template: str = "caption"
    out: str = "experiments/edit"
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.words is None and self.concept not in CONCEPTS:
            raise ValueError(
                f"--concept {self.concept!r}: choose from {', '.join(CONCEPTS)}, or give --words"
            )
        if self.words is not None and not self.control_words:
            # No control would leave the edit's specificity unmeasured, and no word set can
            # be drawn for an arbitrary model's vocabulary: the user names one.
            raise ValueError(
                "edit: --words needs --control-words, a concept the edit should leave alone "
                "(with --concept colour / shape the other set is the control)"
            )
        if not math.isfinite(self.alpha):
            raise ValueError(f"edit: --alpha {self.alpha} is not a finite number")
        if len(set(self.concept_words)) < 2:
            raise ValueError("edit: the concept needs at least two distinct words")
        if set(self.concept_words) & set(self.control):
            raise ValueError(
                "edit: words in both the concept and the control: "
                f"{sorted(set(self.concept_words) & set(self.control))}"
            )
        if self.k < 1 or self.images < 1:
            raise ValueError(f"edit: --k {self.k} and --images {self.images} must be at least 1")

    @property
    def concept_words(self) -> tuple[str, ...]:
        return tuple(self.words) if self.words is not None else CONCEPTS[self.concept]

    @property
    def control(self) -> tuple[str, ...]:
        if self.control_words is not None:
            return tuple(self.control_words)
        others = [name for name in CONCEPTS if name != self.concept]
        return CONCEPTS[others[0]]


def words_of(text: str) -> list[str]:
    """A caption's words: lower-cased runs of letters."""
    return re.findall(r"[a-z]+", text.lower())


def count_words(text: str, words: tuple[str, ...], *, present: str | None = None) -> int:
    """How many of the caption's words are in ``words`` (and, with ``present``, also occur
    in that text: the image's own caption and object descriptions).

    >>> count_words("A red circle and a Red star.", ("red", "blue"))
    2
    >>> count_words("a red circle and a blue star", ("red", "blue"), present="a red circle")
    1
    """
    vocabulary = {w.lower() for w in words}
    if present is not None:
        vocabulary &= set(words_of(present))
    return sum(token in vocabulary for token in words_of(text))


def reference_text(sample: Any) -> str:
    """What the image shows, in words: its caption and every object's description."""
    record = sample.record
    return " ".join([record.caption or "", *(o.description for o in record.objects)])


def caption_samples(
    dataset: str | None, split: str, n_images: int, progress: bool
) -> tuple[Path, Any, list[Any]]:
    """(directory, split, one sample per image for the first ``n_images`` images)."""
    directory = Path(dataset) if dataset else ensure_heldout_dataset(progress=progress)
    data = load_split(directory, split)
    firsts, seen = [], set()
    for sample in data.samples:
        if sample.image_id not in seen:
            seen.add(sample.image_id)
            firsts.append(sample)
    return directory, data, firsts[:n_images]


def pursuit_scores(session: Session, config: EditConfig, cache: ResultCache) -> xr.DataArray:
    """SOMP explained variance of the concept for every head on the store's samples, cached."""
    settings = ModelProbeSettings(
        words=config.concept_words,
        k=min(config.pursuit_k, len(config.concept_words)),
        positions=config.positions,
        device=config.device,
        dtype=config.dtype,
    )
    fields = {
        **session.store_fields(),
        "probe": "pursuit",
        "settings": asdict(settings),
        "model": session.model_name,
        "numerics": session.numerics,
    }

    def compute() -> list:
        result = probe_scores(
            session.ds, ["pursuit"], settings=settings, loaded=session.model, progress=session.progress
        )
        return result["pursuit"].values.tolist()

    values, _ = cache.get_or_compute("scores", fields, compute)
    coords = {"layer": session.ds["layer"].values, "head": session.ds["head"].values}
    return xr.DataArray(
        np.asarray(values, dtype=float), dims=("layer", "head"), coords=coords, name="pursuit"
    )


def _captions(
    session: Session,
    config: EditConfig,
    samples: list[Any],
    data_fingerprint: str,
    heads: tuple[Head, ...],
    cache: ResultCache,
) -> tuple[list[str], bool]:

    fields = {
        "model": session.model_name,
        "numerics": session.numerics,
        "data": data_fingerprint,
        "images": [s.image_id for s in samples],
        "template": config.template,
        "max_new_tokens": config.max_new_tokens,
        "alpha": config.alpha if heads else None,
        "heads": [list(h) for h in heads],
    }

    def compute() -> list[str]:
        adapter = session.model[1]
        with session.editor.edited(HeadEdit.scaled(heads, config.alpha)) as edited:
            rows = generate_captions(
                edited, adapter, samples, max_new_tokens=config.max_new_tokens, template=config.template
            )
        return [row["generated"] for row in rows]

    return cache.get_or_compute("captions", fields, compute)


def _counts(captions: list[str], samples: list[Any], config: EditConfig) -> dict[str, list[int]]:
    """Each measure of ``MEASURES`` for every caption."""
    shown = [reference_text(s) for s in samples]
    out: dict[str, list[int]] = {}
    for name, words in (("concept", config.concept_words), ("control", config.control)):
        out[name] = [count_words(c, words) for c in captions]
        out[f"{name}_correct"] = [count_words(c, words, present=p) for c, p in zip(captions, shown)]
    out["words"] = [len(words_of(c)) for c in captions]
    return out


def _entry(
    setup: str,
    kind: str,
    seed: int | None,
    heads: tuple[Head, ...],
    top: tuple[Head, ...],
    captions: list[str],
    samples: list[Any],
    base: dict[str, list[int]],
    config: EditConfig,
    cached: bool,
) -> dict[str, Any]:
    counts = _counts(captions, samples, config)
    metrics = {m: summary(counts[m]) for m in MEASURES}
    change = {m: paired_change(counts[m], base[m]) for m in MEASURES}
    ratio = {m: paired_ratio(counts[m], base[m]) for m in MEASURES}
    for name, (right, said) in PRECISIONS.items():
        metrics[name] = paired_ratio(counts[right], counts[said])  # sum right / sum said, delta-method SE
        change[name] = ratio_change(counts[right], counts[said], base[right], base[said])
        base_share = paired_ratio(base[right], base[said])["mean"]
        ratio[name] = {
            "mean": metrics[name]["mean"] / base_share if base_share else float("nan"),
            "se": float("nan"),
            "n": len(captions),
        }
    return {
        "name": setup,
        "kind": kind,
        "seed": seed,
        "heads": [list(h) for h in heads],
        "per_layer": per_layer(heads),
        "overlap_with_top": overlap(heads, top) if heads else None,
        "captions": [{"image_id": s.image_id, "generated": c} for s, c in zip(samples, captions)][
            :SHOWN_CAPTIONS
        ],
        "metrics": metrics,
        "change": change,
        "ratio": ratio,
        "cached": cached,
    }


def summarise(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (group, measure): change and ratio vs unedited; the matched sets' spread of the
    ratios (word counts) or of the changes (shares of right words)."""
    top = next(e for e in entries if e["kind"] == "top")
    rows = []
    for group in ("top", "matched"):
        members = [e for e in entries if e["kind"] == group]
        if not members:
            continue
        for measure in (*MEASURES, *PRECISIONS):
            row: dict[str, Any] = {"group": group, "measure": measure}
            for what in ("change", "ratio"):
                row[what] = float(np.mean([e[what][measure]["mean"] for e in members]))
                row[f"{what}_se"] = float(np.mean([e[what][measure]["se"] for e in members]))
            if group == "matched":
                of, centre = ("change", 0.0) if measure in PRECISIONS else ("ratio", 1.0)
                values = [e[of][measure]["mean"] for e in members]
                spread = seed_spread(values, top[of][measure]["mean"], centre=centre)
                spread.update(of=of, n_distinct=len({tuple(map(tuple, e["heads"])) for e in members}))
                row["seeds"] = spread
            rows.append(row)
    return rows


def run_edit(
    config: EditConfig = EditConfig(), *, progress: bool = True, loaded: tuple[Any, VLMAdapter] | None = None
) -> dict[str, Any]:
    """Edit the concept's top-K SOMP heads and matched random sets; see the module doc."""
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
    scores = pursuit_scores(session, config, cache)
    top = top_heads(scores, config.k)
    n_heads = session.ds.sizes["head"]
    plan = [("unedited", "unedited", None, ()), (f"top-{config.k}", "top", None, top)]
    plan += [
        (f"matched (seed {s})", "matched", s, random_matched(top, n_heads=n_heads, seed=s))
        for s in config.seeds
    ]
    directory, data, samples = caption_samples(config.dataset, config.split, config.images, progress)
    results = [
        _captions(session, config, samples, data.fingerprint, heads, cache)
        for *_, heads in tracked(plan, "captioning", show=progress, transient=True)
    ]
    base = _counts(results[0][0], samples, config)
    entries = [
        _entry(name, kind, seed, heads, top, captions, samples, base, config, cached)
        for (name, kind, seed, heads), (captions, cached) in zip(plan, results)
    ]
    ranked = top_heads(scores, min(2 * config.k, int(np.isfinite(scores.values).sum())))
    ranking = sorted(
        ({"layer": l, "head": h, "explained": float(scores.sel(layer=l, head=h))} for l, h in ranked),
        key=lambda r: -r["explained"],
    )
    report = {
        "config": asdict(config),
        "model": session.model_name,
        "store": str(session.store),
        "dataset": str(directory),
        "n_images": len(samples),
        "concept": config.concept if config.words is None else "words",
        "words": list(config.concept_words),
        "control_words": list(config.control),
        "k": config.k,
        "alpha": config.alpha,
        "seeds": list(config.seeds),
        "ranking": ranking,
        "setups": entries,
        "summary": summarise(entries),
        "seconds": time.time() - began,
    }
    return write_json(Path(config.out) / "edit.json", report)
