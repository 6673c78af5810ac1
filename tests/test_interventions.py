"""Head edits (mechhi.intervene.heads) on tiny models of every family.

Reference: the plain model (no nnsight) with a ``register_forward_pre_hook`` on each
chosen layer's ``o_proj`` that edits the same input columns by hand; the path to
``o_proj`` is walked by hand here too (tests.references.o_projections).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import xarray as xr

from mechhi.intervene import EditedModel, HeadEdit, HeadEditor
from tests.conftest import noise_image, tiny
from tests.references import DESCRIPTIONS, SIZES, hooked, o_projections


def _batch(adapter):
    sizes = SIZES if adapter.variable_image_size else [(224, 224)] * 3
    return adapter.prepare([noise_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)], DESCRIPTIONS)


def _head_dim(model, adapter) -> int:
    return o_projections(model, adapter)[0].in_features // adapter.n_heads


def by_hand(model, adapter, edits: dict[tuple[int, int], Callable[[torch.Tensor], torch.Tensor]], run):
    """``run()`` on the plain model with each chosen head's columns of o_proj's input
    replaced by ``edits[(layer, head)](columns)`` (tests.references.hooked)."""
    with hooked(model, adapter, edits), torch.no_grad():
        return run()


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch.inputs).logits


def test_alpha_one_changes_nothing(tiny_case):
    model, adapter = tiny_case
    batch = _batch(adapter)
    every = [(l, h) for l in range(adapter.n_layers) for h in range(adapter.n_heads)]
    with HeadEditor(model, adapter).edited(HeadEdit.scaled(every, 1.0)) as edited:
        assert isinstance(edited, EditedModel)
        out = logits(edited, batch)
    torch.testing.assert_close(out, logits(model, batch), rtol=0, atol=0)


def test_zeroing_heads_equals_zeroing_their_columns_by_hand(tiny_case):
    model, adapter = tiny_case
    batch = _batch(adapter)
    chosen = [(0, 1), (adapter.n_layers - 1, 0), (adapter.n_layers - 1, adapter.n_heads - 1)]
    with HeadEditor(model, adapter).edited(HeadEdit.scaled(chosen, 0.0)) as edited:
        out = logits(edited, batch)
    reference = by_hand(model, adapter, dict.fromkeys(chosen, torch.zeros_like), lambda: logits(model, batch))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    assert (out - logits(model, batch)).abs().max() > 1e-4, "degenerate: zeroing the heads changed nothing"


def test_flip_and_mean_replacement_equal_the_hand_edit(tiny_case):
    model, adapter = tiny_case
    batch = _batch(adapter)
    hd = _head_dim(model, adapter)
    vector = torch.linspace(-1.0, 1.0, hd)
    means = xr.DataArray(
        np.broadcast_to(vector.numpy(), (adapter.n_layers, adapter.n_heads, hd)).copy(),
        dims=("layer", "head", "head_dim"),
        coords={"layer": np.arange(adapter.n_layers), "head": np.arange(adapter.n_heads)},
    )
    edit = HeadEdit(scale={(0, 0): -1.0}, replace=HeadEdit.mean_ablated([(1, 2)], means).replace)
    with HeadEditor(model, adapter).edited(edit) as edited:
        out = logits(edited, batch)
    reference = by_hand(
        model,
        adapter,
        {(0, 0): lambda x: -x, (1, 2): lambda x: vector.expand_as(x)},
        lambda: logits(model, batch),
    )
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


def test_only_the_chosen_heads_change(tiny_case):
    """One edited layer: at its o_proj input the chosen heads' columns are alpha times the
    clean ones, every other column (and every earlier layer) is untouched."""
    model, adapter = tiny_case
    batch = _batch(adapter)
    hd, layer = _head_dim(model, adapter), adapter.n_layers - 1
    seen: dict[str, list[torch.Tensor]] = {"clean": [], "edited": []}
    key = ["clean"]
    handles = [
        p.register_forward_hook(lambda _m, args, _o: seen[key[0]].append(args[0].clone()))
        for p in o_projections(model, adapter)
    ]
    try:
        logits(model, batch)
        key[0] = "edited"
        with HeadEditor(model, adapter).edited(HeadEdit.scaled([(layer, 1), (layer, 3)], 2.5)) as edited:
            logits(edited, batch)
    finally:
        for handle in handles:
            handle.remove()
    clean, edited_in = seen["clean"], seen["edited"]
    assert len(clean) == len(edited_in) == adapter.n_layers
    for earlier in range(layer):
        torch.testing.assert_close(edited_in[earlier], clean[earlier], rtol=0, atol=0)
    for head in range(adapter.n_heads):
        cols = slice(head * hd, (head + 1) * hd)
        factor = 2.5 if head in (1, 3) else 1.0
        torch.testing.assert_close(
            edited_in[layer][..., cols], factor * clean[layer][..., cols], rtol=1e-6, atol=0
        )


def test_edit_inside_an_own_trace_and_cleared_after(tiny_case):
    model, adapter = tiny_case
    batch = _batch(adapter)
    editor = HeadEditor(model, adapter)
    edit = HeadEdit.scaled([(1, 0)], -1.0)
    with torch.no_grad(), editor.nn.trace(**batch.inputs):
        editor.apply(edit)
        out = editor.nn.output.logits.save()
    reference = by_hand(model, adapter, {(1, 0): lambda x: -x}, lambda: logits(model, batch))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    with editor.edited(edit):
        pass
    with torch.no_grad():  # the stored edit is gone: the wrapper runs the model as it is
        plain = editor.nn.trace(**batch.inputs, trace=False).logits
    torch.testing.assert_close(plain, logits(model, batch), rtol=0, atol=0)


def test_generation_runs_under_the_edit_at_every_step():
    model, adapter = tiny("qwen2-vl", "gqa")
    batch = adapter.prepare([noise_image(56, 84)], ["red circle"])
    start = int(batch.layouts[0].query_positions[0])
    prefix = {
        k: v[:, :start] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
        for k, v in batch.inputs.items()
    }
    kwargs = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    heads = [(0, 0), (0, 2), (1, 1)]
    with HeadEditor(model, adapter).edited(HeadEdit.scaled(heads, 4.0)) as edited, torch.no_grad():
        ids = edited.generate(**prefix, **kwargs)
    reference = by_hand(
        model, adapter, {h: lambda x: 4.0 * x for h in heads}, lambda: model.generate(**prefix, **kwargs)
    )
    with torch.no_grad():
        clean = model.generate(**prefix, **kwargs)
    assert ids.shape == reference.shape == (1, start + 6)
    torch.testing.assert_close(ids, reference, rtol=0, atol=0)
    assert not torch.equal(ids, clean), "degenerate: the edit did not change the generated tokens"


def test_bad_edits_are_refused_by_name():
    model, adapter = tiny("qwen2-vl", "gqa")
    editor = HeadEditor(model, adapter)
    outside = pytest.raises(ValueError, match=r"\[\(2, 0\)\] outside the model's 2 layers x 4 heads")
    with outside, editor.edited(HeadEdit.scaled([(2, 0)], 0.0)):
        pass
    with pytest.raises(ValueError, match="both scaled and replaced"):
        HeadEdit(scale={(0, 1): 0.0}, replace={(0, 1): np.zeros(16)})
    wrong_shape = pytest.raises(
        ValueError, match=r"replacement for \(0, 1\) has shape \(3,\), expected \(16,\)"
    )
    with wrong_shape, editor.edited(HeadEdit(replace={(0, 1): np.zeros(3)})):
        pass


class _Sample:
    def __init__(self, image, description):
        self._image, self.description = image, description

    def image(self, use=None):  # as Sample.image: ``use`` (an adapter) may decode it reduced
        return self._image


def test_head_means_average_every_real_token_of_the_reference_set(tiny_case):
    from mechhi.intervene.reference import head_means

    model, adapter = tiny_case
    sizes = SIZES if adapter.variable_image_size else [(224, 224)] * 3
    samples = [
        _Sample(noise_image(h, w, seed=i), d) for i, ((h, w), d) in enumerate(zip(sizes, DESCRIPTIONS))
    ]
    means = head_means(model, adapter, samples, batch_size=2)  # two batches: sums must pool across them
    seen = []
    handles = [
        p.register_forward_hook(lambda _m, args, _o, i=i: seen.append((i, args[0].detach())))
        for i, p in enumerate(o_projections(model, adapter))
    ]
    try:
        rows: dict[int, list[torch.Tensor]] = {}
        for sample in samples:  # one at a time: no padding, every token is real
            seen.clear()
            logits(model, adapter.prepare([sample.image()], [sample.description]))
            for layer, x in seen:
                rows.setdefault(layer, []).append(x[0])
    finally:
        for handle in handles:
            handle.remove()
    hd = _head_dim(model, adapter)
    for layer in (0, adapter.n_layers - 1):
        pooled = torch.cat(rows[layer]).double().mean(0)  # (heads * head_dim,)
        for head in range(adapter.n_heads):
            np.testing.assert_allclose(
                means.sel(layer=layer, head=head).values,
                pooled[head * hd : (head + 1) * hd].numpy(),
                rtol=1e-4,
                atol=1e-6,
            )
    assert means.attrs["tokens"] == sum(len(r) for r in rows[0])
