"""What every command shares: the consoles (stdout for results, stderr for everything
else), the option types, the error boundary and JSON output.

stdout carries only a command's result, printed through ``console`` (a table or a line)
or `print_json`. Everything else goes to stderr: ``err_console`` for messages, and rich's
global console, which every progress bar of the engine uses by default, is pointed at
stderr here, once for all commands.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import rich
import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from typer.core import TyperGroup

from mechhi.jsonfiles import dumps, json_ready

# Width of the results console when stdout is not a terminal: wider than any table, so
# rich never cuts a column to fit (a p-value printed as "2.11e…").
UNCUT_WIDTH = 10_000


class ResultConsole(Console):
    """stdout's console: a terminal's width on a terminal; written to a file or a pipe
    (`mechhi stats > out.txt`, `| less`), as wide as the result needs, whatever the
    terminal around it or $COLUMNS says, so no number loses digits."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        return size if self.is_terminal else ConsoleDimensions(UNCUT_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


rich.reconfigure(stderr=True, soft_wrap=True)  # progress bars and stray rich output: stderr
console = ResultConsole(soft_wrap=True)  # results; one message line stays one line
err_console = Console(stderr=True, soft_wrap=True)

StoreOpt = Annotated[Path, typer.Option("--store", "-s", help="Path of a mechhi zarr store.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda[:N] | mps")]
DtypeOpt = Annotated[
    str,
    typer.Option(help="auto (bfloat16 on a GPU that has it, else float32) | float32 | bfloat16 | float16"),
]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        help="Split a model larger than one GPU over every visible "
        "GPU (then CPU memory) with accelerate: auto | balanced | "
        "balanced_low_0 | sequential. Leave --device at auto."
    ),
]
BatchSizeOpt = Annotated[int, typer.Option(min=1, help="Samples per forward pass.")]
ToyModelOpt = Annotated[
    str | None, typer.Option(help="HF model id or local directory (default: the bundled toy model).")
]
ToyDatasetOpt = Annotated[
    Path | None, typer.Option(help="Dataset directory (default: the bundled synthetic set).")
]
TraceSplitOpt = Annotated[
    str,
    typer.Option(help="auto: the 'trace' split when the dataset has one, else all; all; or a split name."),
]


def friendly_errors(command: Callable) -> Callable:
    """Turn errors into a one-line message and exit code 1 (MECHHI_DEBUG=1 shows the traceback)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            err_console.print(
                "[yellow]interrupted[/]: finished work is kept; rerun the same command to resume"
            )
            raise typer.Exit(130) from None
        except Exception as error:
            if os.environ.get("MECHHI_DEBUG"):
                raise
            text = _store_read_error(kwargs.get("store"), error) or str(error).strip()
            message = text.splitlines()[0] if text else type(error).__name__
            expected = isinstance(error, (ValueError, KeyError, FileNotFoundError, OSError, MemoryError))
            hint = "" if expected else f" ({type(error).__name__}; set MECHHI_DEBUG=1 for the traceback)"
            err_console.print(f"[red]error[/]: {message}{hint}", highlight=False)
            raise typer.Exit(1) from None

    return wrapper


def _store_read_error(store: Any, error: BaseException) -> str | None:
    """A corrupt chunk met while reading a command's ``--store`` (zarr says only "checksum
    do not match"): the message naming the variable, file and samples, and the repair."""
    if not isinstance(store, (str, Path)):
        return None
    from mechhi.store import explain_read_error

    return explain_read_error(store, error)


def usage_error_line(error: typer.TyperException) -> None:
    """Print a parsing error (an option's bad value, an unknown option, a missing
    argument) as the one ``error:`` line every other bad input gets."""
    message = " ".join(error.format_message().split())
    context = getattr(error, "ctx", None)
    hint = f" (see {context.command_path} --help)" if context is not None else ""
    err_console.print(f"[red]error[/]: {escape(message)}{escape(hint)}", highlight=False)


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    return isinstance(value, (list, tuple)) and any(_non_finite(v) for v in value)


def _finite_options(command: Any) -> None:
    """Make every parameter of ``command`` (and of its subcommands) refuse a NaN or
    infinite value, naming the option, while the command line is parsed: before any work."""
    for sub in getattr(command, "commands", {}).values():
        _finite_options(sub)
    for param in command.params:
        if getattr(param, "_finite_checked", False):
            continue
        parse = param.process_value

        def checked(ctx: Any, value: Any, parse: Callable = parse, param: Any = param) -> Any:
            value = parse(ctx, value)
            if _non_finite(value):
                raise typer.BadParameter(f"{value} is not a finite number", ctx=ctx, param=param)
            return value

        param.process_value = checked
        param._finite_checked = True


class OneLineErrors(TyperGroup):
    """The ``mechhi`` group: every error of parsing the command line (a value out of its
    range, not a number, NaN or infinite; an unknown option) is one ``error:`` line and
    exit code 1, like every other bad input, instead of typer's usage box and code 2."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        _finite_options(self)
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except typer.TyperException as error:
            self._refuse(error)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except typer.TyperException as error:
            self._refuse(error)

    @staticmethod
    def _refuse(error: typer.TyperException) -> NoReturn:
        if type(error).__name__ == "NoArgsIsHelpError":  # named as typer itself tells it apart
            raise error  # `mechhi` alone: its help, as asked
        usage_error_line(error)
        raise typer.Exit(1) from None


def _finite(value: Any) -> float | None:
    """A float for JSON, or None where it is NaN (JSON has no NaN)."""
    return json_ready(float(value))


def print_json(payload: Any) -> None:
    sys.stdout.write(dumps(payload, indent=2) + "\n")


MaskThresholdOpt = Annotated[float, typer.Option(help="Binarised mask: token coverage >= this.")]
KeepBestOpt = Annotated[
    bool, typer.Option(help="An object below the threshold keeps its best-covered token.")
]


def open_traced(store: Path):
    """The store, refused if nothing is traced yet or traced data is lost, and warned
    about if only part is traced."""
    from mechhi.store import describe, missing_data, open_store

    ds = open_store(store)
    done, total = int(ds.done.sum()), ds.sizes["sample"]
    if done == 0:
        raise ValueError(f"{store}: no sample has been traced yet")
    lost = missing_data(store)
    if lost:
        raise ValueError(f"{store}: {describe(lost)}; rerun the same `mechhi trace` to trace them again")
    if done < total:
        err_console.print(
            f"[yellow]warning[/]: only {done} of {total} samples are traced; scores cover those. "
            "Rerun the same `mechhi trace` to finish."
        )
    return ds


ExcludeSinksOpt = Annotated[
    bool,
    typer.Option(
        "--exclude-sinks",
        help="Binarise each head's attention without its "
        "sink tokens (attention > --sink-tau x the head's mean on the image): "
        "they neither raise the mean nor count as attended.",
    ),
]
SinkTauOpt = Annotated[
    float,
    typer.Option(help="A sink token takes more than this many times the head's mean attention on the image."),
]


def scored(
    store: Path,
    mask_threshold: float = 0.5,
    keep_best: bool = True,
    exclude_sinks: bool = False,
    sink_tau: float = 20.0,
):
    """The store with head_impact under the asked binarisation rule (`ensure_scored`:
    saved in the store only for its own rule and a complete trace), saying what it did."""
    from probes.head_impact import BinarizeRule, ensure_scored

    open_traced(store)
    attention = "mean-without-sinks" if exclude_sinks else "mean"
    rule = BinarizeRule(
        attention=attention, mask_threshold=mask_threshold, keep_best_token=keep_best, sink_tau=sink_tau
    )
    result = ensure_scored(store, rule)
    if result.note:
        err_console.print(result.note, highlight=False)
    return result.ds


def concept_words(text: str | None) -> tuple[str, ...]:
    """``--words a,b,c`` as a tuple; when not given, the bundled toy world's colour words,
    because the bundled toy is the CLI's default model (the library has no default
    concept). Imported here, not at the top, so `mechhi --help` does not load the world."""
    words = tuple(w.strip() for w in text.split(",") if w.strip()) if text else ()
    if words:
        return words
    from mechhi.data.synthetic import COLOURS

    return tuple(COLOURS)
