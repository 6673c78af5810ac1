"""Where the bundled toy model and the bundled synthetic trace set live inside the
package, and where stores go by default: the defaults of every command."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_MODEL = PACKAGE_DIR / "zoo" / "toy-qwen2vl"  # trained by `mechhi toy train`
BUNDLED_DATASET = PACKAGE_DIR / "data" / "bundled" / "toy-trace"
DEFAULT_STORE_DIR = Path("stores")
