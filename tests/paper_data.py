"""Where the paper's dataset is (``MECHHI_PAPER_DATA``, default shared/data/sergeev2025
beside the checkout), and a mark that skips a test when it is not there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SOURCE = Path(os.environ.get("MECHHI_PAPER_DATA", Path(__file__).parents[2] / "shared/data/sergeev2025"))
needs_source = pytest.mark.skipif(
    not (SOURCE / "dataset_masks.json").is_file(), reason=f"paper dataset not found at {SOURCE}"
)
