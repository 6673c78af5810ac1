"""The `mechhi` command line: thin typer commands over the engine, one module per
pipeline stage (trace, score, ground, store, intervene, flow, figures, data, finetune, toy, zoo).

Each command parses options, calls one engine function and prints its result on stdout
(a table, or JSON with ``--json``); progress, warnings and messages go to stderr. Library
errors (bad dataset, unknown model family, incompatible store, ...) become a one-line
message and exit code 1, never a traceback.
"""

from __future__ import annotations

from mechhi.commands.app import app

# Each module registers its commands; imported in pipeline order, the order --help lists them.
from mechhi.commands import trace  # noqa: F401  # isort: skip
from mechhi.commands import score  # noqa: F401  # isort: skip
from mechhi.commands import ground  # noqa: F401  # isort: skip
from mechhi.commands import store  # noqa: F401  # isort: skip
from mechhi.commands import intervene  # noqa: F401  # isort: skip
from mechhi.commands import flow  # noqa: F401  # isort: skip
from mechhi.commands import finetune  # noqa: F401  # isort: skip
from mechhi.commands import figures  # noqa: F401  # isort: skip
from mechhi.commands import dataset  # noqa: F401  # isort: skip
from mechhi.commands import toy  # noqa: F401  # isort: skip
from mechhi.commands import zoo  # noqa: F401  # isort: skip
from mechhi.commands import bench  # noqa: F401  # isort: skip


def main() -> None:  # pragma: no cover
    app()
