"""Attention knockout: forbid chosen attention edges, in a window of layers, by changing
the mask the model's own attention call receives.

Geva et al. (2023) block attention from one set of positions to another in a window of
layers and read what the answer loses; Zhang et al. (CVPR 2025) do the same between the
image, the question and the last position of a VLM. mechhi does it at the site its tracer
reads (``mechhi.trace.sites``: the ``attention_interface(...)`` call inside each attention
module), by replacing the call's ``attention_mask`` argument through nnsight with one in
which the knocked-out (query row, key column) entries are closed. The model's own kernel
(SDPA or eager) still runs, so nothing else about the forward changes:

- a None mask (SDPA, pure causal, no padding) becomes the causal (and sliding-window)
  bool mask it stands for, with the edges closed;
- a 4-D bool mask (True = attend) gets False at the edges; a 4-D additive float mask
  (eager) gets the dtype's minimum there;
- for chosen heads only, the mask gains a head axis (B, H, T, S): SDPA and eager both
  broadcast it (with a mask present, transformers repeats the key heads for GQA).

Flash attention receives a 2-D padding mask or None and cannot take edges: refused.
A knockout of no edges leaves the call's inputs untouched (bit for bit the plain forward).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mechhi.flow.groups import TokenGroups
from mechhi.models import PreparedBatch, VLMAdapter
from mechhi.trace.sites import DecoderTracer, TracingError, find_attention_call, resolve

FLASH = ("flash_attention_2", "flash_attention_3", "flash_attention")


@dataclass(frozen=True)
class Knockout:
    """Cut the flow ``source -> target`` in ``layers``: the ``target`` group's rows (queries)
    may no longer attend the ``source`` group's columns (keys), in every head or only
    ``heads``. ``Knockout("image", "last", ...)`` keeps the last position from reading the
    image (Geva et al.'s and Zhang et al.'s notation: information flows source -> target)."""

    source: str
    target: str
    layers: tuple[int, ...]
    heads: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("knockout: no layers")
        if self.heads is not None and not self.heads:
            raise ValueError("knockout: an empty head list (omit it for every head)")

    @property
    def label(self) -> str:
        span = f"{min(self.layers)}-{max(self.layers)}" if len(self.layers) > 1 else str(self.layers[0])
        return f"{self.source}->{self.target} @ layers {span}"


def blocked_edges(groups: Sequence[TokenGroups], source: str, target: str, seq: int) -> torch.Tensor:
    """(B, T, S) bool: True where a row of ``target`` would attend a column of ``source``."""
    blocked = torch.zeros(len(groups), seq, seq, dtype=torch.bool)
    for b, g in enumerate(groups):
        rows, cols = torch.as_tensor(g[target]), torch.as_tensor(g[source])
        if len(rows) and len(cols):
            blocked[b, rows[:, None], cols[None, :]] = True
    return blocked


def knocked_mask(
    mask: torch.Tensor | None,
    blocked: torch.Tensor,
    *,
    n_heads: int,
    heads: Sequence[int] | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The attention call's mask with the ``blocked`` (B, T, S) edges closed (module doc)."""
    batch, rows, seq = blocked.shape
    device = blocked.device
    if mask is None:
        keys = torch.arange(seq, device=device)
        queries = torch.arange(rows, device=device)[:, None] + (seq - rows)
        allowed = (
            keys[None, :] <= queries if causal else torch.ones(rows, seq, dtype=torch.bool, device=device)
        )
        if sliding_window is not None:
            allowed = allowed & (keys[None, :] > queries - sliding_window)
        mask = allowed[None, None].expand(batch, 1, rows, seq)
    elif mask.dim() != 4:
        raise TracingError(
            f"knockout needs a 4-D attention mask (sdpa or eager attention); got shape {tuple(mask.shape)}"
        )
    else:
        mask = mask[..., :seq]
    block = blocked[:, None]  # (B, 1, T, S)
    if heads is not None:
        chosen = torch.zeros(n_heads, dtype=torch.bool, device=device)
        chosen[list(heads)] = True
        block = block & chosen[None, :, None, None]  # (B, H, T, S)
    if mask.dtype == torch.bool:
        return mask & ~block
    return torch.where(block, torch.finfo(mask.dtype).min, mask)


class KnockoutRunner(DecoderTracer):
    """The model through nnsight, with each layer's attention call found once.

    >>> runner = KnockoutRunner(model, adapter)                            # doctest: +SKIP
    >>> logits = runner.logits(batch, groups, Knockout("last", "image", (3, 4, 5)))  # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, adapter: VLMAdapter) -> None:
        super().__init__(model, adapter)
        implementation = getattr(model.config, "_attn_implementation", None)
        if implementation in FLASH:
            raise TracingError(f"knockout needs sdpa or eager attention; the model runs {implementation}")
        self.attention = [resolve(layer, adapter.attention) for layer in self.layers]
        self.call_labels = [find_attention_call(a) for a in self.attention]

    def logits(
        self, batch: PreparedBatch, groups: Sequence[TokenGroups], knockout: Knockout | None
    ) -> torch.Tensor:
        """(B, T, vocab) float32 logits of the batch with ``knockout`` applied (None: plain)."""
        batch = batch.to(self.device, self.dtype)
        seq = int(batch.inputs["input_ids"].shape[1])
        self._check(knockout)
        blocked = None
        if knockout is not None:
            blocked = blocked_edges(groups, knockout.source, knockout.target, seq).to(self.device)
            if not bool(blocked.any()):
                knockout = None  # no edge to close: the plain forward, untouched
        with torch.no_grad(), self.nn.trace(**batch.inputs, use_cache=False):
            if knockout is not None:
                for layer in sorted(set(knockout.layers)):
                    self._close(layer, blocked, knockout.heads)
            logits = self.nn.output.logits.save()
        return logits.float()

    def _check(self, knockout: Knockout | None) -> None:
        if knockout is None:
            return
        n_layers, n_heads = len(self.layers), self.adapter.n_heads
        bad_layers = [layer for layer in knockout.layers if not 0 <= layer < n_layers]
        if bad_layers:
            raise ValueError(f"knockout: layers {bad_layers} outside the model's 0..{n_layers - 1}")
        bad_heads = [h for h in knockout.heads or () if not 0 <= h < n_heads]
        if bad_heads:
            raise ValueError(f"knockout: heads {bad_heads} outside the model's 0..{n_heads - 1}")

    def _close(self, layer: int, blocked: torch.Tensor, heads: tuple[int, ...] | None) -> None:
        """Inside the trace: replace layer ``layer``'s attention-call mask."""
        call = getattr(self.attention[layer].source, self.call_labels[layer])
        args, kwargs = call.inputs
        module, query = args[0], args[1]
        has_positional_mask = len(args) > 4
        mask = args[4] if has_positional_mask else kwargs.get("attention_mask")
        closed = knocked_mask(
            mask,
            blocked.to(query.device),
            n_heads=query.shape[1],
            heads=heads,
            causal=getattr(module, "is_causal", True),
            sliding_window=kwargs.get("sliding_window"),
        )
        if has_positional_mask:
            call.inputs = ((*args[:4], closed, *args[5:]), kwargs)
        else:
            call.inputs = (args, {**kwargs, "attention_mask": closed})


def knockout_logits(
    model: torch.nn.Module,
    adapter: VLMAdapter,
    batch: PreparedBatch,
    groups: Sequence[TokenGroups],
    knockout: Knockout | None,
) -> torch.Tensor:
    """One-off `KnockoutRunner.logits` (a job keeps one runner for all its batches)."""
    return KnockoutRunner(model, adapter).logits(batch, groups, knockout)


def windows(n_layers: int, width: int, stride: int | None = None) -> list[tuple[int, ...]]:
    """Consecutive layer windows of ``width`` across the depth, every ``stride`` layers
    (default: non-overlapping; the last window ends at the last layer)."""
    if not 1 <= width <= n_layers:
        raise ValueError(f"--window {width}: must be between 1 and the model's {n_layers} layers")
    stride = stride or width
    starts = list(range(0, n_layers - width + 1, stride))
    if starts[-1] != n_layers - width:
        starts.append(n_layers - width)
    return [tuple(range(s, s + width)) for s in starts]


__all__ = ["Knockout", "KnockoutRunner", "blocked_edges", "knocked_mask", "knockout_logits", "windows"]
