"""`description_attention` against a dense reference written with explicit loops.

The end-to-end tests compare with eager attention for each family; these pin down each
mask convention on its own, including the ones no tiny model produces on CPU (flash's
2-D padding mask, None with a sliding window, a non-causal module).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechhi.models import SampleLayout, VisualView
from mechhi.models._common import PreparedBatch
from mechhi.trace import BatchIndex, TracingError, description_attention

B, H, HKV, T, D = 2, 4, 2, 12, 8
QUERY_ROWS = [np.array([8, 9, 10]), np.array([6, 7])]
VISUAL = [np.array([1, 2, 3, 4]), np.array([2, 3, 4, 5])]
VALID = np.array([[1] * 12, [0, 0] + [1] * 10], dtype=bool)  # sample 1 is left-padded by 2


def reference(q, k, allowed, scaling, softcap=None):
    """(B, H, V) by loops: repeat k per group, softmax over allowed keys, mean over rows."""
    q, k = q.double().numpy(), k.double().numpy()
    out = np.zeros((B, H, 4))
    for b in range(B):
        for h in range(H):
            kv = h // (H // HKV)
            rows = []
            for i in QUERY_ROWS[b]:
                logits = np.array([q[b, h, i] @ k[b, kv, j] for j in range(T)]) * scaling
                if softcap:
                    logits = np.tanh(logits / softcap) * softcap
                logits = np.where(allowed[b, i], logits, -np.inf)
                p = np.exp(logits - logits.max())
                rows.append(p / p.sum())
            out[b, h] = np.mean(rows, axis=0)[VISUAL[b]]
    return out


def index() -> BatchIndex:
    layouts = [
        SampleLayout(rows, (VisualView("image", vis, (2, 2), (0, 0, 2, 2)),))
        for rows, vis in zip(QUERY_ROWS, VISUAL)
    ]
    return BatchIndex.from_batch(PreparedBatch({}, layouts), torch.device("cpu"))


def causal_allowed(window=None, valid=None, causal=True):
    j, i = np.meshgrid(np.arange(T), np.arange(T))
    allowed = (j <= i) if causal else np.ones((T, T), bool)
    if window is not None:
        allowed &= j > i - window
    allowed = np.broadcast_to(allowed, (B, T, T)).copy()
    if valid is not None:
        allowed &= valid[:, None, :]
    return allowed


@pytest.fixture
def qk():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, H, T, D, generator=g), torch.randn(B, HKV, T, D, generator=g)


def run(q, k, mask, **kw):
    return description_attention(q, k, mask, index(), scaling=kw.pop("scaling", D**-0.5), **kw).numpy()[
        :, :, :4
    ]


def test_none_mask_is_causal(qk):
    q, k = qk
    np.testing.assert_allclose(run(q, k, None), reference(q, k, causal_allowed(), D**-0.5), atol=1e-6)


def test_none_mask_with_sliding_window(qk):
    q, k = qk
    expected = reference(q, k, causal_allowed(window=5), D**-0.5)
    np.testing.assert_allclose(run(q, k, None, sliding_window=5), expected, atol=1e-6)
    assert np.any(expected == 0), "the window must cut some visual keys off for the test to mean anything"


def test_none_mask_non_causal_module(qk):
    q, k = qk
    expected = reference(q, k, causal_allowed(causal=False), D**-0.5)
    np.testing.assert_allclose(run(q, k, None, causal=False), expected, atol=1e-6)


def test_bool_4d_mask_with_padding(qk):
    q, k = qk
    allowed = causal_allowed(valid=VALID)
    mask = torch.as_tensor(allowed)[:, None]  # (B, 1, T, T), True = attend
    np.testing.assert_allclose(run(q, k, mask), reference(q, k, allowed, D**-0.5), atol=1e-6)


def test_additive_4d_mask_and_softcap(qk):
    q, k = qk
    allowed = causal_allowed(window=7, valid=VALID)
    mask = torch.where(torch.as_tensor(allowed), 0.0, torch.finfo(torch.float32).min)[:, None]
    got = run(q, k, mask, scaling=0.3, softcap=2.0)
    np.testing.assert_allclose(got, reference(q, k, allowed, 0.3, softcap=2.0), atol=1e-6)


def test_flash_2d_padding_mask(qk):
    q, k = qk
    got = run(q, k, torch.as_tensor(VALID, dtype=torch.long))
    np.testing.assert_allclose(got, reference(q, k, causal_allowed(valid=VALID), D**-0.5), atol=1e-6)


def test_unsupported_mask_type_is_a_clear_error(qk):
    q, k = qk
    with pytest.raises(TracingError, match="flex"):
        run(q, k, object())
