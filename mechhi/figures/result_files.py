"""Which result a JSON file is, and its `ResultTable`.

Three commands write results that `plot results` and `report` draw: ``mechhi experiment``
(``results.json``: Tables 4 and 5), ``mechhi ablate`` (``ablate.json``) and ``mechhi edit``
(``edit.json``); a hand-made generic table (`ResultTable.from_dict`) is the fourth kind.
They are told apart by their keys, not their file names, so a copied or renamed file
still reads; a folder is searched for the three file names.

>>> kind, file, data = read_result("experiments/ablate")   # doctest: +SKIP
>>> kind
'ablation'
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mechhi.figures.causal import from_ablation, from_edit
from mechhi.figures.results import ResultTable, from_experiment
from mechhi.figures.style import PlotError

FILES = {"experiment": "results.json", "ablation": "ablate.json", "edit": "edit.json"}
COMMANDS = {"experiment": "mechhi experiment", "ablation": "mechhi ablate", "edit": "mechhi edit"}
ADAPTERS: dict[str, Callable[[Mapping[str, Any]], ResultTable]] = {
    "experiment": from_experiment,
    "ablation": from_ablation,
    "edit": from_edit,
    "table": ResultTable.from_dict,
}


def result_kind(data: Any) -> str | None:
    """experiment | ablation | edit | table, or None when the JSON is none of them."""
    if not isinstance(data, dict):
        return None
    if "table4" in data:
        return "experiment"
    kinds = {s.get("kind") for s in data.get("setups", []) if isinstance(s, dict)}
    if "summary" in data and "unablated" in kinds:
        return "ablation"
    if "summary" in data and "unedited" in kinds:
        return "edit"
    if {"setups", "metrics", "cells"} <= set(data):
        return "table"
    return None


def _file_in(folder: Path) -> Path:
    found = [folder / name for name in FILES.values() if (folder / name).is_file()]
    if not found:
        raise PlotError(
            f"{folder} holds none of {', '.join(FILES.values())} (run `mechhi experiment`, "
            "`mechhi ablate` or `mechhi edit` with --out there first)"
        )
    if len(found) > 1:
        raise PlotError(f"{folder} holds {' and '.join(f.name for f in found)}: give the file itself")
    return found[0]


def read_result(path: str | Path) -> tuple[str, Path, dict[str, Any]]:
    """(kind, file, parsed JSON) of a result file, or of the one result file in a folder."""
    path = Path(path)
    if not path.exists():
        raise PlotError(f"no result at {path}")
    file = _file_in(path) if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PlotError(f"{file} is not JSON: {err}") from None
    kind = result_kind(data)
    if kind is None:
        raise PlotError(
            f"{file} is none of the known results (`mechhi experiment`'s results.json, `mechhi ablate`'s "
            "ablate.json, `mechhi edit`'s edit.json, a result table: see mechhi.figures.results)"
        )
    return kind, file, data


def load_results(path: str | Path, kind: str | None = None) -> ResultTable:
    """The result table of a result file or folder; with ``kind``, refuse any other kind."""
    found, file, data = read_result(path)
    if kind is not None and found != kind:
        raise PlotError(f"{file} is {COMMANDS.get(found, 'a result table')}'s result, not {COMMANDS[kind]}'s")
    try:
        return ADAPTERS[found](data)
    except (KeyError, TypeError, StopIteration) as err:
        raise PlotError(f"{file}: incomplete {found} result ({type(err).__name__}: {err})") from None
