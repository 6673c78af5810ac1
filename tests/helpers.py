"""Running `mechhi` commands in tests, with the CLI contract checked on every run: stdout
carries only the result, and with ``--json`` that result parses as JSON.

>>> payload = invoke_json(["rank", "--store", str(store)])   # doctest: +SKIP
>>> result = invoke(["dataset", "check", str(root)], exit_code=1)   # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from typer.testing import CliRunner, Result

from mechhi.commands import app


def invoke(args: Sequence[str], *, exit_code: int | None = 0) -> Result:
    """Run ``mechhi args...`` in-process; check the exit code (None: any) and that an
    error is reported in one line on stderr with no traceback and no usage box."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if exit_code is not None:
        assert result.exit_code == exit_code, f"exit {result.exit_code}, wanted {exit_code}:\n{result.output}"
    assert "Traceback" not in result.output, result.output
    if result.exit_code != 0:  # a bad command line too: one line, not typer's usage box
        assert "╭" not in result.stderr and not result.stderr.startswith("Usage:"), result.stderr
    if result.exit_code == 1 and "error" in result.stderr:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and not result.stderr.split(errors[0], 1)[1].strip(), result.stderr
    return result


def invoke_json(args: Sequence[str], *, exit_code: int | None = 0) -> Any:
    """Run ``mechhi args... --json``; stdout must be exactly one JSON document. Returns it."""
    result = invoke([*args, "--json"], exit_code=exit_code)
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as error:
        raise AssertionError(f"--json stdout is not JSON ({error}):\n{result.stdout}") from None


def one_line_error(result: Result) -> str:
    """The single ``error: ...`` line of a failed command."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) >= 1 and lines[-1].startswith("error: "), result.stderr
    return lines[-1]


def cli_trace(model_dir, data, store, *extra, exit_code=0) -> Result:
    """``mechhi trace`` of ``data`` by ``model_dir`` into ``store`` on the CPU, 3 images a batch."""
    return invoke(
        [
            "trace",
            "--model",
            model_dir,
            "--dataset",
            data,
            "--store",
            store,
            "--device",
            "cpu",
            "--batch-size",
            "3",
            *extra,
        ],
        exit_code=exit_code,
    )
