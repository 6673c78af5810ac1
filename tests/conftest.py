"""Shared fixtures: tiny random-weight models of every supported family.

Each family adapter lists ``tiny_cases`` (name -> `build_tiny` keyword arguments); the
tests are parametrised over all of them, so a new family is tested by adding its file.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from mechhi.models import FAMILIES, adapter_for

# One thread: tiny models gain nothing from two, and OpenMP's spinning threads slow a
# busy 2-core machine down many times over.
torch.set_num_threads(1)

WORDS = "red green blue yellow circle square triangle star small large".split()

CASES = [(f.family, case) for f in FAMILIES for case in f.tiny_cases]


@functools.lru_cache(maxsize=None)
def tiny(family: str, case: str):
    """(model, adapter) for one tiny case, float32, eval mode, built once per session."""
    cls = next(f for f in FAMILIES if f.family == family)
    torch.manual_seed(0)
    model, processor = cls.build_tiny(words=WORDS, **cls.tiny_cases[case])
    model = model.float().eval()
    return model, adapter_for(model.config, processor)


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(params=CASES, ids=[f"{f}-{c}" for f, c in CASES])
def tiny_case(request):
    family, case = request.param
    return tiny(family, case)
