"""Finished work of the experiments, kept as JSON files keyed by what it depends on.

A setup's results are the expensive part (per-sample scores of an edited model, a
fine-tuned adapter's evaluation); each is kept in a file whose key is a hash of every
input that determines it (model, data, head set or layers, edit, settings), so a rerun
finds it, a changed input misses it, and two setups that draw the same head set share
one. Files are ``<root>/<kind>-<key>.json``, or ``<root>/<name>.json`` for a named slot
(one file per setup that a person can find, e.g. ``experiments/toy/setups/top-5.json``),
which holds the key it was computed under and is a miss when the key differs. Used by
`mechhi ablate`, `edit`, `patch`, `knockout` and `experiment`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mechhi.jsonfiles import json_key


class ResultCache:
    """JSON files under ``root``, each ``{"key": ..., "fields": ..., "value": ...}``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, kind: str, fields: dict[str, Any], *, name: str | None = None) -> Path:
        return self.root / (f"{name}.json" if name is not None else f"{kind}-{json_key(fields)}.json")

    def get(self, kind: str, fields: dict[str, Any], *, name: str | None = None) -> Any | None:
        path = self.path(kind, fields, name=name)
        if not path.is_file():
            return None
        try:
            held = json.loads(path.read_text())
        except ValueError:  # a torn or foreign file: recompute it
            return None
        if not isinstance(held, dict) or held.get("key", json_key(fields)) != json_key(fields):
            return None  # a named slot computed under other settings
        if "value" in held:
            return held["value"]
        return held.get("entry")  # a slot written by mechhi 0.1's `experiment` ({"key", "entry"})

    def put(self, kind: str, fields: dict[str, Any], value: Any, *, name: str | None = None) -> Any:
        path = self.path(kind, fields, name=name)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        record = {"key": json_key(fields), "fields": fields, "value": value}
        partial.write_text(json.dumps(record, default=str) + "\n")
        partial.replace(path)  # atomic: a kill never leaves half a result under the real name
        return value

    def get_or_compute(
        self, kind: str, fields: dict[str, Any], compute: Callable[[], Any], *, name: str | None = None
    ) -> tuple[Any, bool]:
        """(value, whether it came from the cache)."""
        found = self.get(kind, fields, name=name)
        if found is not None:
            return found, True
        return self.put(kind, fields, compute(), name=name), False
