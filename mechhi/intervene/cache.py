"""Finished work of the intervention jobs, kept as JSON files keyed by what it depends on.

A setup's per-sample results are the expensive part; each is a file named by a hash of
every input that determines it (model, data, head set, edit, settings), so a rerun finds
it, a changed input misses it, and two setups that draw the same head set share one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def key_of(fields: dict[str, Any]) -> str:
    """16 hex digits of sha256 over the fields as canonical JSON."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ResultCache:
    """``<root>/<kind>-<key>.json`` files, each holding ``{"fields": ..., "value": ...}``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, kind: str, fields: dict[str, Any]) -> Path:
        return self.root / f"{kind}-{key_of(fields)}.json"

    def get(self, kind: str, fields: dict[str, Any]) -> Any | None:
        path = self.path(kind, fields)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())["value"]
        except (ValueError, KeyError):  # a torn or foreign file: recompute it
            return None

    def put(self, kind: str, fields: dict[str, Any], value: Any) -> Any:
        path = self.path(kind, fields)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps({"fields": fields, "value": value}, default=str) + "\n")
        partial.replace(path)  # atomic: a kill never leaves half a result under the real name
        return value

    def get_or_compute(self, kind: str, fields: dict[str, Any], compute: Callable[[], Any]) -> tuple[Any, bool]:
        """(value, whether it came from the cache)."""
        found = self.get(kind, fields)
        if found is not None:
            return found, True
        return self.put(kind, fields, compute()), False
