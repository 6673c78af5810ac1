"""Activation patching: copy a site's activation from the clean run into the corrupted run,
one site at a time, and see how much of the clean answer comes back.

Sites are the ones the rest of mechhi edits (``mechhi.trace.sites``):

- a head: its slice of the attention output at ``o_proj``'s input (the heads side by side,
  ``head_dim`` columns each), at every position or at one token group's positions;
- the residual stream: a decoder layer's output at one token group's positions.

The metric (`Metric`) is read at one position of the teacher-forced clean description:
with a counterfactual description, the logit difference between the clean and the
counterfactual token where the two descriptions first differ; without one, the clean
description's log-probability. Normalised per setup over samples, ``effect = mean(m_patched
- m_corrupted) / mean(m_clean - m_corrupted)``: 0 = the corrupted run, 1 = the clean run.

Memory: the clean run keeps only the patched sites' activations (one (T, width) tensor per
layer and site kind); patched runs are batched, one site per copy of the corrupted input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import nnsight
import numpy as np
import torch

from mechhi.flow.counterfactual import Pair
from mechhi.flow.groups import token_groups
from mechhi.models import PreparedBatch, VLMAdapter
from mechhi.trace.sites import DecoderTracer, output_projections

SITE_KINDS = ("heads", "residual")


@dataclass(frozen=True)
class Metric:
    """Where and how one sample is scored: logits at ``position`` (the clean token minus the
    counterfactual token), or the clean answer's log-probability (``counter`` None)."""

    position: int
    clean_token: int
    counter_token: int | None
    answer_positions: np.ndarray
    answer_tokens: np.ndarray

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, T, vocab) -> (B,) metric values (differentiable)."""
        if self.counter_token is not None:
            row = logits[:, self.position].float()
            return row[:, self.clean_token] - row[:, self.counter_token]
        logp = torch.log_softmax(
            logits[:, self.answer_positions - 1].float(), dim=-1
        )  # token t predicted at t - 1
        index = torch.as_tensor(self.answer_tokens, device=logits.device)[None, :, None].expand(
            len(logits), -1, 1
        )
        return logp.gather(-1, index)[..., 0].sum(-1)


def metric_of(adapter: VLMAdapter, batch: PreparedBatch, counter: str | None, image) -> Metric:
    """The metric of a one-sample ``batch`` (the clean description, teacher forced)."""
    layout = batch.layouts[0]
    positions = np.asarray(layout.query_positions)
    ids = batch.inputs["input_ids"][0, positions].cpu().numpy()
    if counter is None:
        return Metric(int(positions[0]) - 1, int(ids[0]), None, positions, ids)
    other = adapter.prepare([image], [counter])
    other_ids = other.inputs["input_ids"][0, np.asarray(other.layouts[0].query_positions)].cpu().numpy()
    differ = [k for k in range(min(len(ids), len(other_ids))) if ids[k] != other_ids[k]]
    if not differ:
        raise ValueError(f"the counterfactual description {counter!r} has the clean one's tokens")
    k = differ[0]
    return Metric(int(positions[k]) - 1, int(ids[k]), int(other_ids[k]), positions, ids)


class Patcher(DecoderTracer):
    """A model's head and residual sites through nnsight, for clean-to-corrupted patching.

    >>> patcher = Patcher(model, adapter)                            # doctest: +SKIP
    >>> result = patcher.patch_heads(pair)                           # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, adapter: VLMAdapter, batch_size: int = 16) -> None:
        super().__init__(model, adapter)
        self.projections = output_projections(self.nn, adapter)
        width = int(self.projections[0]._module.in_features)
        self.head_dim = width // adapter.n_heads
        self.batch_size = batch_size

    # -------------------------------------------------------------- the two runs

    def prepared(self, pair: Pair) -> tuple[PreparedBatch, PreparedBatch, Metric]:
        """The clean and corrupted one-sample batches (same tokens) and the sample's metric."""
        description = pair.sample.description
        clean = self.adapter.prepare([pair.clean], [description])
        corrupted = self.adapter.prepare([pair.corrupted], [description])
        if not torch.equal(clean.inputs["input_ids"], corrupted.inputs["input_ids"]):
            raise ValueError(f"sample {pair.sample.index}: the corrupted image changes the prompt's tokens")
        return clean, corrupted, metric_of(self.adapter, clean, pair.counter, pair.clean)

    def clean_sites(self, batch: PreparedBatch, kind: str) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each layer's activation at the site kind ((1, T, width)), and the run's logits."""
        batch = batch.to(self.device, self.dtype)
        with torch.no_grad(), self.nn.trace(**batch.inputs, use_cache=False):
            saved = nnsight.save([])
            for layer in range(len(self.layers)):
                site = self.projections[layer].input if kind == "heads" else self.layers[layer].output
                saved.append(_first(site).clone())
            logits = self.nn.output.logits.save()
        return list(saved), logits

    def logits(self, batch: PreparedBatch) -> torch.Tensor:
        batch = batch.to(self.device, self.dtype)
        with torch.no_grad(), self.nn.trace(**batch.inputs, use_cache=False):
            logits = self.nn.output.logits.save()
        return logits

    # -------------------------------------------------------------- patching

    def patch_heads(self, pair: Pair, positions: str | None = None) -> dict[str, np.ndarray | float]:
        """Exact patching of every head: ``effect`` (layer, head) terms of the sample (see
        `summarise`). ``positions``: a token group to patch at (default every position)."""
        clean, corrupted, metric = self.prepared(pair)
        sites, clean_logits = self.clean_sites(clean, "heads")
        where = self._positions(clean, pair, positions)
        n_layers, n_heads = len(self.layers), self.adapter.n_heads
        heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
        patched = self._patched_runs(
            pair, heads, lambda chunk: self._head_plan(chunk, where), "heads", sites, metric
        )
        return _terms(metric, clean_logits, self.logits(corrupted), patched.reshape(n_layers, n_heads))

    def patch_residual(self, pair: Pair, groups: Sequence[str]) -> dict[str, np.ndarray | float]:
        """Exact patching of the residual stream after each layer at each group's positions:
        (layer, group) terms."""
        clean, corrupted, metric = self.prepared(pair)
        sites, clean_logits = self.clean_sites(clean, "residual")
        where = {g: self._positions(clean, pair, g) for g in groups}
        cells = [(layer, g) for layer in range(len(self.layers)) for g in groups]
        patched = self._patched_runs(
            pair, cells, lambda chunk: self._residual_plan(chunk, where), "residual", sites, metric
        )
        return _terms(
            metric, clean_logits, self.logits(corrupted), patched.reshape(len(self.layers), len(groups))
        )

    def _positions(self, batch: PreparedBatch, pair: Pair, group: str | None) -> torch.Tensor | None:
        if group is None or group == "all":
            return None
        return torch.as_tensor(token_groups(batch.layouts[0], pair.sample.mask())[group])

    def _head_plan(self, chunk: Sequence[tuple[int, int]], where: torch.Tensor | None) -> dict[int, list]:
        plan: dict[int, list] = {}
        for j, (layer, head) in enumerate(chunk):
            columns = slice(head * self.head_dim, (head + 1) * self.head_dim)
            plan.setdefault(layer, []).append((j, where, columns))
        return plan

    def _residual_plan(
        self, chunk: Sequence[tuple[int, str]], where: dict[str, torch.Tensor]
    ) -> dict[int, list]:
        plan: dict[int, list] = {}
        for j, (layer, group) in enumerate(chunk):
            plan.setdefault(layer, []).append((j, where[group], slice(None)))
        return plan

    def _patched_runs(
        self, pair: Pair, cells: Sequence, plan_of, kind: str, sites: list[torch.Tensor], metric: Metric
    ) -> np.ndarray:
        """The metric of the corrupted run with each cell's site patched from the clean run
        (``sites``: the clean run's activations), ``batch_size`` cells per forward (one per
        copy of the corrupted input)."""
        out = []
        for start in range(0, len(cells), self.batch_size):
            chunk = cells[start : start + self.batch_size]
            copies = self.adapter.prepare(
                [pair.corrupted] * len(chunk), [pair.sample.description] * len(chunk)
            )
            copies = copies.to(self.device, self.dtype)
            plan = plan_of(chunk)
            with torch.no_grad(), self.nn.trace(**copies.inputs, use_cache=False):
                for layer in sorted(plan):
                    site = (
                        self.projections[layer].input
                        if kind == "heads"
                        else _first(self.layers[layer].output)
                    )
                    for j, positions, columns in plan[layer]:
                        source = sites[layer][0].to(site.device)
                        if positions is None:
                            site[j, :, columns] = source[:, columns]
                        else:
                            site[j, positions, columns] = source[positions, columns]
                values = metric(self.nn.output.logits).save()
            out.append(values.float().cpu().numpy())
        return np.concatenate(out)


def _first(value):
    """A decoder layer's output is its hidden states (transformers 5) or a tuple led by them."""
    return value[0] if isinstance(value, tuple) else value


def _terms(
    metric: Metric, clean_logits: torch.Tensor, corrupted_logits: torch.Tensor, patched: np.ndarray
) -> dict[str, np.ndarray | float]:
    """One sample's raw terms: its clean and corrupted metric and each site's patched metric."""
    clean = float(metric(clean_logits)[0])
    corrupted = float(metric(corrupted_logits)[0])
    return {"clean": clean, "corrupted": corrupted, "patched": patched}


def summarise(terms: Sequence[dict[str, np.ndarray | float]]) -> dict[str, np.ndarray]:
    """Over samples: ``effect`` = mean(patched - corrupted) / mean(clean - corrupted) per site
    (0 = corrupted, 1 = clean) with its delta-method standard error, and ``gap`` (the mean
    clean - corrupted metric the normalisation divides by)."""
    patched = np.stack([np.asarray(t["patched"], dtype=np.float64) for t in terms])  # (N, *sites)
    clean = np.asarray([t["clean"] for t in terms], dtype=np.float64)
    corrupted = np.asarray([t["corrupted"] for t in terms], dtype=np.float64)
    gained = patched - corrupted.reshape(-1, *[1] * (patched.ndim - 1))
    gap = (clean - corrupted).reshape(gained.shape[:1] + (1,) * (patched.ndim - 1))
    mean_gap = float(gap.mean())
    if mean_gap == 0:
        nan = np.full(patched.shape[1:], np.nan)
        return {"effect": nan, "se": nan, "gap": np.asarray(mean_gap)}
    effect = gained.mean(0) / mean_gap
    n = len(terms)
    residual = (gained - effect[None] * gap) / mean_gap  # delta method for a ratio of means
    se = residual.std(0, ddof=1) / np.sqrt(n) if n > 1 else np.full(effect.shape, np.nan)
    return {"effect": effect, "se": se, "gap": np.asarray(mean_gap)}
