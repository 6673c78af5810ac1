"""The JSON mechhi writes: results, reports, cache keys, `--json` output.

One set of rules for all of them, so every file and every `--json` line parses with any
JSON reader: NaN and infinities become null (JSON has neither), tuples lists, numpy
values plain numbers, paths strings. A cache key is the same fields' canonical JSON
hashed, so a setting that changes a result changes its key. Imports nothing of mechhi.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any


def _numpy() -> Any:
    """numpy if something imported it, else None: no numpy value can exist without it, and
    the CLI's `--help` path, which imports this module, should not pay for loading it."""
    return sys.modules.get("numpy")


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for numpy values, paths and objects with ``to_dict``."""
    np = _numpy()
    if np is not None and isinstance(value, np.generic):
        return value.item()
    if np is not None and isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def json_ready(value: Any) -> Any:
    """``value`` with NaN and infinities as None, tuples as lists, numpy values plain.

    >>> import numpy as np
    >>> json_ready({"a": (1.0, float("nan")), "b": np.float32(2.5)})
    {'a': [1.0, None], 'b': 2.5}
    """
    np = _numpy()
    if np is not None and isinstance(value, np.ndarray):
        value = value.tolist()
    if np is not None and isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def dumps(value: Any, *, indent: int | None = 1) -> str:
    """``value`` as strict JSON (no NaN), after `json_ready`."""
    return json.dumps(json_ready(value), indent=indent, default=json_default, allow_nan=False)


def write_json(path: str | os.PathLike, value: Any) -> Any:
    """Write ``value`` to ``path`` atomically (a killed run leaves the old file or none,
    never half of one); returns what was written, JSON-ready."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ready = json_ready(value)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(ready, indent=1, default=json_default, allow_nan=False) + "\n")
    os.replace(partial, path)
    return ready


def json_key(fields: Any) -> str:
    """16 hex digits of sha256 over ``fields`` as canonical JSON: a cache key.

    >>> json_key({"b": 1, "a": 2}) == json_key({"a": 2, "b": 1})
    True
    """
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
