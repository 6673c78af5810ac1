"""The `mechhi` command line: thin typer commands over the engine, one module per
pipeline stage (trace, score, store, intervene, figures, data, finetune, toy, zoo).

Each command parses options, calls one engine function and prints its result on stdout
(a table, or JSON with ``--json``); progress, warnings and messages go to stderr. Library
errors (bad dataset, unknown model family, incompatible store, ...) become a one-line
message and exit code 1, never a traceback.
"""

from __future__ import annotations

from .app import app

# Each module registers its commands; imported in pipeline order, the order --help lists them.
from . import trace  # noqa: E402, F401  # isort: skip
from . import score  # noqa: E402, F401  # isort: skip
from . import store  # noqa: E402, F401  # isort: skip
from . import intervene  # noqa: E402, F401  # isort: skip
from . import finetune  # noqa: E402, F401  # isort: skip
from . import figures  # noqa: E402, F401  # isort: skip
from . import data  # noqa: E402, F401  # isort: skip
from . import toy  # noqa: E402, F401  # isort: skip
from . import zoo  # noqa: E402, F401  # isort: skip
from . import bench  # noqa: E402, F401  # isort: skip


def main() -> None:  # pragma: no cover
    app()
