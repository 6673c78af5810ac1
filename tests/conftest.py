"""Shared fixtures: tiny random-weight models of every supported family, a small
multi-view store for the probes, a tiny model and a dataset on disk for the trace
commands, and the bundled toy model with a store traced from it for the causal checks.

`mechhi.models.tiny.CASES` lists each family's test variants (name -> `build_tiny`
keyword arguments); the tests are parametrised over all of them, so a new family is
tested by adding its adapter and its tiny builder.

Every fixture that more than one test module uses is defined here; test modules import
no fixtures from one another. Plain helpers live in helper modules (helpers.py,
references.py, toy_dataset.py, ...), imported as usual.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pytest
import typer.testing

# Nothing heavy at the top: pytest-xdist's controller imports this file before it starts
# the workers, and torch, transformers and mechhi's models cost it about 6 s there, on the
# clock of every run. The workers import them with the test modules anyway; the fixtures
# below import what they use.


# typer's CliRunner builds the click command tree from the app on every invoke (0.1 s, and
# a run invokes some 300 times): build it once per process. Sound because nothing in the
# tree changes after import: choices that read a registry (probes) are checked when a
# command runs, not by click.
typer.testing._get_command = functools.cache(typer.testing._get_command)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One thread: tiny models gain nothing from two, and OpenMP's spinning threads slow a
    busy 2-core machine down many times over."""
    import torch

    torch.set_num_threads(1)


# The tiers (pytest marks, given here by module so the list is the layout): ``integration``
# runs commands end to end (the CLI, stores on disk, several processes, a browser, the
# README's blocks); every other test is ``unit`` (a function against an independent
# reference, in memory or on a tmp store). ``slow`` is marked by hand and kept out of
# `make test` (`make test-slow`). `make test-unit` runs the unit tier alone.
INTEGRATION = (
    "test_readme",
    "test_cli_",
    "test_trace_job",
    "test_trace_pipeline",
    "test_trace_distributed",
    "test_finetune_accelerate",
    "test_report_browser",
    "test_store_scale",
    "test_experiment",
    "test_score_cli_causal",
    "test_bench",
    "test_report",
)


def pytest_itemcollected(item: pytest.Item) -> None:
    """The tier mark of each test, by its module."""
    item.add_marker("integration" if item.path.stem.startswith(INTEGRATION) else "unit")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The integration files first, each file's tests in their order (a stable sort): they
    are the long ones (20-50 s a file against a few for most unit files), and `make test`
    deals whole files to its workers in this order, so a long file that started last would
    leave the other worker idle; the many short unit files fill the end evenly."""
    items.sort(key=lambda item: item.get_closest_marker("integration") is None)


WORDS = ["red", "green", "blue", "yellow", "circle", "square", "triangle", "star", "small", "large"]


@functools.cache
def tiny(family: str, case: str):
    """(model, adapter) for one tiny case, float32, eval mode, built once per session."""
    import torch

    from mechhi.models import adapter_for
    from mechhi.models.tiny import CASES, build_tiny

    torch.manual_seed(0)
    model, processor = build_tiny(family, words=WORDS, **CASES[family][case])
    model = model.float().eval()
    return model, adapter_for(model.config, processor)


def noise_image(height: int, width: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``tiny_case``: every family's every case (`mechhi.models.tiny.CASES`), read at
    collection, in the workers, rather than at this file's import."""
    if "tiny_case" in metafunc.fixturenames:
        from mechhi.models.tiny import CASES

        cases = [(family, case) for family, variants in CASES.items() for case in variants]
        metafunc.parametrize("tiny_case", cases, ids=[f"{f}-{c}" for f, c in cases], indirect=True)


@pytest.fixture
def tiny_case(request):
    family, case = request.param
    return tiny(family, case)


# ---------------------------------------------------------------- a small multi-view store
# Five samples of different own grids in two views (a tile mosaic "image" and a "global"
# view), padded to MAX; probes are checked on it against plain loops.
L, H = 3, 2
GRIDS = [
    {"image": (2, 3), "global": (1, 2)},
    {"image": (3, 3), "global": (2, 2)},
    {"image": (1, 2), "global": (2, 1)},
    {"image": (3, 1), "global": (1, 1)},
    {"image": (2, 2), "global": (2, 2)},
]
MAX = {"image": (3, 3), "global": (2, 2)}


def multiview_maps(seed: int) -> tuple[dict, dict]:
    """Per sample and view, own-grid attention (L, H, r, c) and coverage (r, c)."""
    rng = np.random.default_rng(seed)
    att = {(s, v): rng.random((L, H) + g) for s, grids in enumerate(GRIDS) for v, g in grids.items()}
    cov = {
        (s, v): rng.choice([0.0, 0.1, 0.3, 0.5, 0.9], size=g)
        for s, grids in enumerate(GRIDS)
        for v, g in grids.items()
    }
    cov[(3, "image")][:] = 0.2  # a small object: keep-best claims every tied token
    cov[(3, "global")][:] = 0.1
    return att, cov


@pytest.fixture
def multiview_store(tmp_path: Path) -> tuple[Path, dict, dict]:
    import zarr

    from mechhi.store import SampleMeta, create_store, pad_grid, write_batch

    att, cov = multiview_maps(seed=3)
    path = tmp_path / "t.zarr"
    samples = [SampleMeta(f"i{s}", f"o{s}", f"d{s}", g) for s, g in enumerate(GRIDS)]
    attrs = {"model": "m", "model_revision": "r", "dtype": "float32", "prompt_template": "p", "dataset": "d"}
    create_store(path, samples=samples, n_layers=L, n_heads=H, attrs=attrs)
    for batch in ([0, 1], [4, 3], [2]):
        write_batch(
            path,
            batch,
            attention={v: np.stack([pad_grid(att[(s, v)], *MAX[v]) for s in batch]) for v in MAX},
            mask={v: np.stack([pad_grid(cov[(s, v)], *MAX[v]) for s in batch]) for v in MAX},
        )
    # Sample 2 as after a kill between its data write and its done flag: data there, not done.
    zarr.open_array(str(path / "done"), mode="r+")[2] = False
    return path, att, cov


# ---------------------------------------------------------------- the trace commands' model and dataset
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from mechhi.models.tiny import tiny_qwen2_vl

    directory = tmp_path_factory.mktemp("tiny-qwen2vl")
    tiny_qwen2_vl(directory, words=WORDS, layers=3)
    return directory


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    from tests.toy_dataset import write_toy_dataset

    root = tmp_path_factory.mktemp("dataset")
    write_toy_dataset(root)
    return root


# ---------------------------------------------------------------- the causal checks: the bundled toy model
STORE_SAMPLES = 12


@pytest.fixture(scope="module")
def toy_model():
    from mechhi.bundled import BUNDLED_MODEL
    from mechhi.models.loading import load

    return load(BUNDLED_MODEL, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def traced_toy_store(tmp_path_factory):
    """The bundled trace set's first samples, traced by the bundled model and scored: once
    per test process. Tests take a copy (``toy_store``), never this one."""
    from mechhi.bundled import BUNDLED_MODEL
    from mechhi.models.loading import load
    from mechhi.trace.trace_dataset import TraceConfig, trace_dataset
    from probes.head_impact import score_store

    path = tmp_path_factory.mktemp("traced-toy") / "toy.zarr"
    loaded = load(BUNDLED_MODEL, device="cpu", dtype="float32")
    trace_dataset(
        TraceConfig(store=str(path), limit=STORE_SAMPLES, device="cpu"), progress=False, loaded=loaded
    )
    score_store(path)
    return path


@pytest.fixture(scope="module")
def toy_store(traced_toy_store, tmp_path_factory):
    """A module's own copy of the traced toy store: what one module writes into it or
    beside it (scores, `<store>.patch`) never reaches another module."""
    return Path(shutil.copytree(traced_toy_store, tmp_path_factory.mktemp("store") / "toy.zarr"))


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    from mechhi.data.synthetic import build_synthetic
    from mechhi.models.toy import HELD_OUT_SEED

    return build_synthetic(
        tmp_path_factory.mktemp("held-out") / "data",
        n_images=8,
        seed=HELD_OUT_SEED,
        splits={"test": 1.0},
        progress=False,
    )


@pytest.fixture(scope="module")
def shallow_model(tmp_path_factory):
    """A tiny Qwen2-VL with the toy's words but 6 decoder layers (the toy has 12)."""
    from mechhi.models.tiny import tiny_qwen2_vl
    from mechhi.models.toy import vocabulary

    directory = tmp_path_factory.mktemp("shallow")
    tiny_qwen2_vl(directory, words=vocabulary(), layers=6, heads=4)
    return directory
