"""`adapter.grid_sizes(image_size)`: every view's grid from the image size alone, checked
against what the processor makes of real images of that size, for every family's tiny
case (the store is sized from it before any image is read)."""

from __future__ import annotations

import pytest

from tests.conftest import noise_image

# (width, height): square, both aspect ratios, tiny (below Qwen2-VL's min_pixels), large
# (above its max_pixels and the tiling threshold), odd sizes that round differently,
# and extreme aspect ratios.
SIZES = [
    (84, 84),
    (140, 112),
    (112, 140),
    (20, 30),
    (31, 17),
    (401, 299),
    (640, 480),
    (97, 1003),
    (1203, 55),
    (223, 225),
    (56, 168),
    (333, 333),
]


def processor_grids(adapter, size):
    width, height = size
    layout = adapter.prepare([noise_image(height, width, seed=width * height)], ["red square"]).layouts[0]
    return {v.name: v.grid for v in layout.views}


def test_grid_sizes_equal_the_processors_grids(tiny_case):
    _, adapter = tiny_case
    for size in SIZES:
        assert adapter.grid_sizes(size) == processor_grids(adapter, size), f"image {size[0]}x{size[1]}"


def test_qwen2_vl_grid_rule_needs_no_processor_run(monkeypatch):
    """The closed-form rule (smart_resize) is used, not the processor fallback."""
    from tests.conftest import tiny

    _, adapter = tiny("qwen2-vl", "gqa")
    expected = {size: processor_grids(adapter, size) for size in SIZES}
    monkeypatch.setattr(adapter, "prepare", lambda *a, **k: pytest.fail("the processor ran"))
    assert {size: adapter.grid_sizes(size) for size in SIZES} == expected


def test_an_adapter_survives_pickling_into_a_worker(tiny_case):
    """DataLoader workers started by spawn or forkserver (Python 3.14's default) get the
    adapter pickled; they must prepare exactly what the parent prepares."""
    import pickle

    import torch

    _, adapter = tiny_case
    image = noise_image(90, 130, seed=5)
    copy = pickle.loads(pickle.dumps(adapter))
    here, there = adapter.prepare([image], ["red square"]), copy.prepare([image], ["red square"])
    assert here.inputs.keys() == there.inputs.keys()
    for key in here.inputs:
        assert torch.equal(here.inputs[key], there.inputs[key]), key
    assert [v.grid for v in here.layouts[0].views] == [v.grid for v in there.layouts[0].views]
