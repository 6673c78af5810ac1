"""Where the bundled toy model and the bundled synthetic trace set live inside the
package, how stores name them, and where stores go by default: the defaults of every
command.

The bundled model and dataset have names that do not depend on where mechhi is
installed (``mechhi/zoo/toy-qwen2vl``, ``mechhi/data/bundled/toy-trace``): a store
records these, not an absolute path of one machine, and every command accepts them as
``--model`` / ``--dataset``. Two slashes keep them apart from any HF hub id (owner/name).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_MODEL = PACKAGE_DIR / "zoo" / "toy-qwen2vl"  # trained by `mechhi toy train`
BUNDLED_DATASET = PACKAGE_DIR / "data" / "bundled" / "toy-trace"
BUNDLED_MODEL_ID = "mechhi/zoo/toy-qwen2vl"
BUNDLED_DATASET_ID = "mechhi/data/bundled/toy-trace"
DEFAULT_STORE_DIR = Path("stores")
DEMO_STORE = DEFAULT_STORE_DIR / "toy.zarr"  # the bundled model on the bundled set (`make demo`)

_BUNDLED = {BUNDLED_MODEL_ID: BUNDLED_MODEL, BUNDLED_DATASET_ID: BUNDLED_DATASET}


def local_path(name: str | os.PathLike) -> str:
    """Where a model or dataset name points: a bundled name -> its directory in the
    package; anything else (an HF id, a path) unchanged.

    >>> local_path("Qwen/Qwen2-VL-2B-Instruct")
    'Qwen/Qwen2-VL-2B-Instruct'
    """
    return str(_BUNDLED.get(str(name), name))


def recorded_name(name: str | os.PathLike) -> str:
    """The name a store records: the bundled name for the bundled model or dataset
    (however it was given), else the id or path as given (``data/toy/`` as ``data/toy``).

    >>> recorded_name(BUNDLED_MODEL)
    'mechhi/zoo/toy-qwen2vl'
    """
    for label, directory in _BUNDLED.items():
        if str(name) == label or (Path(name).exists() and Path(name).resolve() == directory):
            return label
    return os.path.normpath(str(name))


def default_store(model: str | os.PathLike, dataset: str | os.PathLike, template: str = "caption") -> Path:
    """``stores/<model>__<dataset>.zarr``, named by the last part of each name (the demo's
    bundled pair is ``stores/toy.zarr``), with ``__<template>`` for a prompt template other
    than the default caption: one store per model x dataset x template, never shared.

    >>> default_store("Qwen/Qwen2-VL-2B-Instruct", "data/coco")
    PosixPath('stores/Qwen2-VL-2B-Instruct__coco.zarr')
    >>> default_store(BUNDLED_MODEL_ID, BUNDLED_DATASET_ID, "vqa")
    PosixPath('stores/toy__vqa.zarr')
    """
    model, dataset = recorded_name(model), recorded_name(dataset)
    if (model, dataset) == (BUNDLED_MODEL_ID, BUNDLED_DATASET_ID):
        base = DEMO_STORE.stem
    else:
        base = f"{_short(model)}__{_short(dataset)}"
    return DEFAULT_STORE_DIR / (f"{base}.zarr" if template == "caption" else f"{base}__{template}.zarr")


def _short(name: str) -> str:
    return Path(name).name or Path(name).resolve().name
