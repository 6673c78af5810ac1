"""Attribution patching: every head's patching effect estimated in one forward and one
backward pass.

Exact patching (`mechhi.flow.patching`) runs the corrupted input once per head. To first
order, patching head h changes the metric by ``(a_clean - a_corrupted) . dm/da`` at that
head's site (its slice of ``o_proj``'s input), the gradient taken on the corrupted run
(Nanda 2023; Syed et al. 2023, "attribution patching"). One clean forward gives a_clean,
one corrupted forward and one backward give a_corrupted and the gradient at every head's
site together, so the cost does not grow with the number of heads: what makes a causal
score affordable for every head of a 7B model. It is an approximation (it misses
saturation, e.g. a softmax already at 1); `mechhi patch --method attribution` reports its
rank correlation with exact patching where both ran.

Memory: the model's weights are frozen for the pass (no weight gradients are made), the
first head site is the graph's only leaf, and ``torch.autograd.grad`` returns the head
sites' gradients only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import nnsight
import numpy as np
import torch

from mechhi.flow.counterfactual import Pair
from mechhi.flow.patching import Patcher


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Every parameter without ``requires_grad`` for the block (restored after)."""
    before = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in before:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in before:
            p.requires_grad_(flag)


def attribute_heads(
    patcher: Patcher, pair: Pair, positions: str | None = None
) -> dict[str, np.ndarray | float]:
    """One sample's terms as `Patcher.patch_heads` gives them, with ``patched`` the
    first-order estimate ``corrupted + (a_clean - a_corrupted) . grad`` per (layer, head)."""
    clean, corrupted, metric = patcher.prepared(pair)
    sites, clean_logits = patcher.clean_sites(clean, "heads")
    where = patcher._positions(clean, pair, positions)
    batch = corrupted.to(patcher.device, patcher.dtype)
    n_layers, n_heads, width = len(patcher.layers), patcher.adapter.n_heads, patcher.head_dim
    with frozen(patcher.model), torch.enable_grad():
        with patcher.nn.trace(**batch.inputs, use_cache=False):
            acts = nnsight.save([])
            for layer in range(n_layers):
                site = patcher.projections[layer].input  # (1, T, heads * head_dim)
                if layer == 0:
                    site.requires_grad_(True)  # nothing upstream needs a gradient: the graph starts here
                acts.append(site)
            value = metric(patcher.nn.output.logits).save()
        grads = torch.autograd.grad(value.sum(), list(acts))
    estimate = np.zeros((n_layers, n_heads))
    for layer, (act, grad) in enumerate(zip(acts, grads)):
        delta = (sites[layer].to(act.device) - act.detach()) * grad  # (1, T, heads * head_dim)
        if where is not None:
            delta = delta[:, where.to(delta.device)]
        estimate[layer] = delta.float().sum(dim=(0, 1)).view(n_heads, width).sum(-1).cpu().numpy()
    corrupted_value = float(value.detach()[0])
    return {
        "clean": float(metric(clean_logits)[0]),
        "corrupted": corrupted_value,
        "patched": corrupted_value + estimate,
    }
