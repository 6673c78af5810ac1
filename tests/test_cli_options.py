"""Every option of every `mechhi` command, as the command line parses it: a value out of
its range, not a number, NaN or infinite, or an unknown option is one ``error:`` line
naming the option, exit code 1, before any work (no usage box, no exit code 2)."""

from __future__ import annotations

import pytest
import typer.main

from mechhi.commands import app
from tests.helpers import invoke, one_line_error


def _commands(command, path=()):
    subcommands = getattr(command, "commands", None)
    if subcommands:
        for name, sub in subcommands.items():
            yield from _commands(sub, (*path, name))
    else:
        yield path, command


def _options(kind: type) -> list[tuple[tuple[str, ...], str, object]]:
    """(command path, option, its minimum) of every ``kind`` option of every command."""
    found = []
    for path, command in _commands(typer.main.get_command(app)):
        for param in command.params:
            described = param.type_descriptor
            if param.param_type_name == "option" and described.annotation is kind:
                found.append((path, param.opts[0], described.parameter_info.min))
    return found


FLOATS = _options(float)
RANGED_INTS = [(path, option, low) for path, option, low in _options(int) if low is not None]


def test_the_walk_finds_the_options_the_issue_names():
    assert (("edit",), "--alpha", None) in FLOATS and len(FLOATS) >= 5
    assert (("ablate",), "--n-heads", 1) in RANGED_INTS and (("edit",), "--k", 1) in RANGED_INTS


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize(("path", "option", "low"), FLOATS, ids=lambda v: v if isinstance(v, str) else None)
def test_a_non_finite_float_is_one_line_naming_the_option(path, option, low, value, tmp_path):
    result = invoke([*path, option, value], exit_code=1)
    line = one_line_error(result)
    # an option with a minimum refuses NaN and -inf by its range check first: one line all the same
    said = "not a finite number" in line or (low is not None and "greater than or equal to" in line)
    assert f"'{option}'" in line and said, line
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("path", "option", "low"), RANGED_INTS, ids=lambda v: v if isinstance(v, str) else None
)
def test_a_value_below_the_range_is_one_line_and_exit_1(path, option, low):
    result = invoke([*path, option, str(low - 1)], exit_code=1)
    line = one_line_error(result)
    assert f"'{option}'" in line and "greater than or equal to" in line, line
    assert "╭" not in result.stderr and "Usage:" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    "args",
    [["ablate", "--n-heads", "two"], ["rank", "--no-such-option"], ["no-such-command"], ["dataset", "check"]],
)
def test_other_command_line_errors_are_one_line_too(args):
    result = invoke(args, exit_code=1)
    line = one_line_error(result)
    assert "--help" in line and "╭" not in result.stderr, result.stderr


def test_top_level_cli_py_is_the_app_every_entry_point_runs():
    """The design card's cli.py: `python cli.py`, the `mechhi` script and `python -m mechhi`."""
    import subprocess
    import sys
    from importlib.metadata import entry_points
    from pathlib import Path

    import cli
    from mechhi.commands import app

    assert cli.app is app
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "mechhi"]
    assert script.value == "cli:app" and script.load() is app
    root = Path(__file__).resolve().parents[1]
    for command in ([sys.executable, "cli.py", "--help"], [sys.executable, "-m", "mechhi", "--help"]):
        shown = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=120, check=False)
        assert shown.returncode == 0 and "trace" in shown.stdout, shown.stderr
