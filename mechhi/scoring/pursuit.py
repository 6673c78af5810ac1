"""Head Pursuit over a dataset: the `mechhi pursuit` job.

Runs the model on the dataset's samples (the same samples and prompt `mechhi trace`
uses), collects every head's write into the residual stream averaged over the image
tokens (or the description tokens), and ranks heads by how much of that signal a few
of the concept's unembedding directions explain (``probes.head_pursuit``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xarray as xr

from mechhi.bundled import BUNDLED_DATASET_ID, BUNDLED_MODEL_ID
from mechhi.models import VLMAdapter
from mechhi.models.loading import load
from mechhi.progress import progress_bar
from mechhi.store import relative_depth
from mechhi.trace.head_outputs import HeadOutputTracer
from mechhi.trace.trace_dataset import TraceConfig, load_samples
from probes.head_pursuit import pursue_heads, random_row_ids


@dataclass(frozen=True)
class PursuitConfig:
    model: str = BUNDLED_MODEL_ID
    dataset: str = BUNDLED_DATASET_ID
    words: tuple[
        str, ...
    ] = ()  # the concept's single-token words (required: a library knows no world's words)
    k: int = 3  # SOMP steps (atoms per head); at most len(words)
    positions: str = "image"  # average each head's write over the image tokens, or "answer"
    limit: int | None = None
    batch_size: int = 4
    device: str = "auto"
    dtype: str = "auto"
    template: str = "caption"
    split: str = "auto"
    control_draws: int = 10  # random vocabulary dictionaries of len(words) rows: median and IQR
    control_seed: int = 0

    def __post_init__(self) -> None:
        if self.control_draws < 0:
            raise ValueError(f"--control-draws {self.control_draws}: must be at least 0")
        if len(set(self.words)) < 2:
            raise ValueError("pursuit needs at least two distinct concept words")
        if not 1 <= self.k <= len(self.words):
            raise ValueError(
                f"pursuit: k={self.k} must be between 1 and the number of words ({len(self.words)})"
            )
        if self.positions not in HeadOutputTracer.POSITIONS:
            raise ValueError(
                f"positions={self.positions!r}: choose from {', '.join(HeadOutputTracer.POSITIONS)}"
            )


def single_token_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """The token id of each word as it appears inside text (with a leading space for
    BPE vocabularies, bare for word-level ones). Head Pursuit's atoms are single tokens:
    a word that splits is refused by name rather than silently reduced to a piece."""
    ids, split = [], []
    unknown = getattr(tokenizer, "unk_token_id", None)
    for word in words:
        found = None
        for variant in (" " + word, word):
            pieces = tokenizer(variant, add_special_tokens=False)["input_ids"]
            if len(pieces) == 1 and pieces[0] != unknown:  # a word-level vocabulary maps strangers to <unk>
                found = int(pieces[0])
                break
        if found is None:
            split.append(word)
        else:
            ids.append(found)
    if split:
        raise ValueError(f"not single tokens for this tokenizer (split or unknown): {', '.join(split)}")
    if len(set(ids)) != len(ids):
        raise ValueError("two concept words map to the same token")
    return ids


def concept_dictionary(model: torch.nn.Module, adapter: VLMAdapter, words: Sequence[str]) -> np.ndarray:
    """(len(words), hidden): the unembedding rows of the concept's tokens."""
    unembedding = model.get_output_embeddings().weight
    return unembedding[single_token_ids(adapter.tokenizer, words)].detach().float().cpu().numpy()


def control_dictionaries(
    model: torch.nn.Module, adapter: VLMAdapter, words: Sequence[str], draws: int, seed: int = 0
) -> np.ndarray:
    """(draws, len(words), hidden): random unembedding rows, never a concept word's or the
    image token's (`probes.head_pursuit.random_row_ids`); only the drawn rows are copied
    off the model (a 262k vocabulary's full matrix is most of a small model)."""
    unembedding = model.get_output_embeddings().weight.detach()
    exclude = single_token_ids(adapter.tokenizer, words)
    image_token = getattr(adapter, "image_token_id", None)
    if image_token is not None:
        exclude.append(int(image_token))
    ids = random_row_ids(unembedding.shape[0], len(words), draws, seed=seed, exclude=exclude)
    return (
        unembedding[torch.as_tensor(ids.ravel(), device=unembedding.device)]
        .float()
        .cpu()
        .numpy()
        .reshape(*ids.shape, unembedding.shape[1])
    )


def head_signals(
    model: torch.nn.Module,
    adapter: VLMAdapter,
    samples: Sequence[Any],
    *,
    positions: str,
    batch_size: int,
    template: str = "caption",
    progress: bool = True,
) -> xr.DataArray:
    """(sample, layer, head, hidden) per-head writes, averaged over ``positions``."""
    tracer = HeadOutputTracer(model, adapter)
    chunks = []
    with progress_bar("head outputs", len(samples), show=progress) as bar:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            batch = adapter.prepare(
                [s.image(adapter) for s in chunk], [s.description for s in chunk], template=template
            )
            chunks.append(tracer.trace(batch, positions=positions))
            bar.advance(len(chunk))
    values = np.concatenate(chunks)
    n_layers = values.shape[1]
    return xr.DataArray(
        values,
        dims=("sample", "layer", "head", "hidden"),
        coords={
            "sample": np.arange(len(samples)),
            "layer": np.arange(n_layers),
            "head": np.arange(values.shape[2]),
            "depth": ("layer", relative_depth(n_layers)),
        },
        name="head_write",
    )


def pursuit_inputs(
    config: PursuitConfig, *, progress: bool = True, loaded: tuple[Any, VLMAdapter] | None = None
) -> tuple[xr.DataArray, np.ndarray]:
    """The per-head writes over ``config``'s samples and the concept's dictionary: what
    Head Pursuit (and the logit lens, ``probes.logit_lens``) reads."""
    model, adapter = loaded or load(config.model, device=config.device, dtype=config.dtype)
    dictionary = concept_dictionary(model, adapter, config.words)  # fails fast on a bad word
    dataset = load_samples(
        TraceConfig(model=config.model, dataset=config.dataset, split=config.split), adapter
    )
    samples = dataset.samples[: config.limit] if config.limit else dataset.samples
    if len(samples) < 2:
        raise ValueError(f"pursuit needs at least 2 samples, {config.dataset} has {len(samples)}")
    signals = head_signals(
        model,
        adapter,
        samples,
        positions=config.positions,
        batch_size=config.batch_size,
        template=config.template,
        progress=progress,
    )
    return signals, dictionary


def run_pursuit(
    config: PursuitConfig, *, progress: bool = True, loaded: tuple[Any, VLMAdapter] | None = None
) -> xr.Dataset:
    """Head Pursuit of ``config.words`` on every head; see ``probes.head_pursuit.pursue_heads``."""
    loaded = loaded or load(config.model, device=config.device, dtype=config.dtype)
    signals, dictionary = pursuit_inputs(config, progress=progress, loaded=loaded)
    controls = control_dictionaries(*loaded, config.words, config.control_draws, config.control_seed)
    result = pursue_heads(
        signals, dictionary, list(config.words), config.k, controls=controls, control_seed=config.control_seed
    )
    result.attrs.update(
        {
            "model": config.model,
            "dataset": config.dataset,
            "positions": config.positions,
            "samples": signals.sizes["sample"],
        }
    )
    return result
