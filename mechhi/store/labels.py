"""Short readable labels for stores: what `combine`'s ``model`` dim, the figures' legends and
panels and the report's columns call each store.

One place for this, so a comparison reads the same everywhere: a model is named by its HF
id as it is or a path by its last component (never an absolute path); stores that share a
model are told apart by the first of dataset, prompt template or file stem that differs.
A user may name stores instead (`check_labels` refuses what would make a comparison
ambiguous: a count that does not match, an empty or a repeated label).

>>> short_name({"model": "/home/me/zoo/toy-qwen2vl"})
'toy-qwen2vl'
>>> short_name({"model": "Qwen/Qwen2-VL-2B-Instruct"})
'Qwen/Qwen2-VL-2B-Instruct'
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mechhi.store.schema import StoreError

HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _last_component(text: str) -> str:
    return Path(text.rstrip("/\\")).name or text


def short_name(attrs: Mapping[str, Any], source: str | Path | None = None) -> str:
    """The model's label: an HF id as it is; a path (absolute, relative with several parts,
    or an existing folder) by its last component; without a model, the store's file stem.

    >>> short_name({"model": "mechhi/zoo/toy-qwen2vl"})
    'toy-qwen2vl'
    >>> short_name({}, "stores/qwen2vl.zarr")
    'qwen2vl'
    """
    model = str(attrs.get("model") or "").strip()
    if model:
        looks_like_path = Path(model).is_absolute() or model.startswith((".", "~")) or model.count("/") > 1
        if looks_like_path or not HF_ID.match(model) or Path(model).is_dir():
            return _last_component(model)
        return model
    return Path(str(source)).stem if source else "unknown model"


def dataset_name(attrs: Mapping[str, Any]) -> str:
    """The dataset's label: the last component of the path recorded in the store (the
    ``#fingerprint`` dropped; a recorded ``{"path": ...}`` mapping is read too).

    >>> dataset_name({"dataset": "/data/bundled/toy-trace#8af9dab4"})
    'toy-trace'
    """
    recorded = attrs.get("dataset") or ""
    if isinstance(recorded, Mapping):
        recorded = recorded.get("path") or ""
    recorded = str(recorded)
    path = recorded.rpartition("#")[0] if "#" in recorded else recorded
    return _last_component(path) if path else "unknown dataset"


def _source(ds: Any, source: str | Path | None) -> str:
    return str(source if source is not None else ds.encoding.get("source", ""))


def model_labels(stores: Sequence[Any], sources: Sequence[str | Path] | None = None) -> list[str]:
    """One label per store (an ``xr.Dataset``; `sources`: where each was read from, default
    its ``encoding["source"]``): its short model name; stores that share it get, in
    brackets, the first of dataset, prompt template or file stem that tells them apart.

    Identical stores keep identical labels: a suffix like "#2" would claim a difference.
    """
    where = [_source(ds, None if sources is None else sources[i]) for i, ds in enumerate(stores)]
    names = [short_name(ds.attrs, w or None) for ds, w in zip(stores, where)]
    labels = list(names)
    tellers = (
        lambda i: dataset_name(stores[i].attrs),
        lambda i: str(stores[i].attrs.get("prompt_template", "")),
        lambda i: Path(where[i]).stem,
    )
    for name in set(names):
        group = [i for i, n in enumerate(names) if n == name]
        for teller in tellers if len(group) > 1 else ():
            values = [teller(i) for i in group]
            if len(set(values)) > 1:
                for i, value in zip(group, values):
                    labels[i] = f"{name} ({value})"
                break
    return labels


def check_labels(labels: Sequence[Any], n_stores: int, what: str = "labels") -> list[str]:
    """User-given labels, one non-empty distinct string per store, or a StoreError naming the problem."""
    labels = list(labels)
    if len(labels) != n_stores:
        raise StoreError(
            f"{what}: {len(labels)} given for {n_stores} store{'s' if n_stores != 1 else ''} (one per store)"
        )
    for label in labels:
        if not isinstance(label, str) or not label.strip():
            raise StoreError(f"{what}: {label!r} is not a label (a non-empty string)")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise StoreError(
            f"{what}: {', '.join(map(repr, repeated))} given to more than one store (labels must differ)"
        )
    return [label.strip() for label in labels]
