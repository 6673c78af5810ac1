"""What every command shares: the consoles (stdout for results, stderr for everything
else), the option types, the error boundary and JSON output.

stdout carries only a command's result, printed through ``console`` (a table or a line)
or `print_json`. Everything else goes to stderr: ``err_console`` for messages, and rich's
global console, which every progress bar of the engine uses by default, is pointed at
stderr here, once for all commands.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import rich
import typer
from rich.console import Console

rich.reconfigure(stderr=True, soft_wrap=True)  # progress bars and stray rich output: stderr
console = Console(soft_wrap=True)  # results; one message line stays one line
err_console = Console(stderr=True, soft_wrap=True)

StoreOpt = Annotated[Path, typer.Option("--store", "-s", help="Path of a mechhi zarr store.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda[:N] | mps")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bfloat16 on a GPU that has it, else float32) | float32 | bfloat16 "
                                            "| float16")]
DeviceMapOpt = Annotated[Optional[str], typer.Option(help="Split a model larger than one GPU over every visible "
                                                          "GPU (then CPU memory) with accelerate: auto | balanced | "
                                                          "balanced_low_0 | sequential. Leave --device at auto.")]
BatchSizeOpt = Annotated[int, typer.Option(min=1, help="Samples per forward pass.")]
ToyModelOpt = Annotated[Optional[str], typer.Option(help="HF model id or local directory (default: the bundled toy model).")]
ToyDatasetOpt = Annotated[Optional[Path], typer.Option(help="Dataset directory (default: the bundled synthetic set).")]
TraceSplitOpt = Annotated[str, typer.Option(help="auto: the 'trace' split when the dataset has one, else all; all; or a split name.")]


def friendly_errors(command: Callable) -> Callable:
    """Turn errors into a one-line message and exit code 1 (MECHHI_DEBUG=1 shows the traceback)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: finished work is kept; rerun the same command to resume")
            raise typer.Exit(130) from None
        except Exception as error:  # noqa: BLE001 - the CLI boundary: report, never a traceback
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


def _finite(value: Any) -> float | None:
    """A float for JSON, or None where it is NaN (JSON has no NaN)."""
    number = float(value)
    return None if number != number else number


def print_json(payload: Any) -> None:
    from mechhi.store import json_default

    sys.stdout.write(json.dumps(payload, indent=2, default=json_default) + "\n")


MaskThresholdOpt = Annotated[float, typer.Option(help="Binarised mask: token coverage >= this.")]
KeepBestOpt = Annotated[bool, typer.Option(help="An object below the threshold keeps its best-covered token.")]


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
        err_console.print(f"[yellow]warning[/]: only {done} of {total} samples are traced; scores cover those. "
                          "Rerun the same `mechhi trace` to finish.")  # fmt: skip
    return ds


ExcludeSinksOpt = Annotated[bool, typer.Option("--exclude-sinks", help="Binarise each head's attention without its "
                                               "sink tokens (attention > --sink-tau x the head's mean on the image): "
                                               "they neither raise the mean nor count as attended.")]  # fmt: skip
SinkTauOpt = Annotated[float, typer.Option(help="A sink token takes more than this many "
                                           "times the head's mean attention on the image.")]  # fmt: skip


def scored(store: Path, mask_threshold: float = 0.5, keep_best: bool = True, exclude_sinks: bool = False,
           sink_tau: float = 20.0):  # fmt: skip
    """The store with head_impact under the asked binarisation rule (`ensure_scored`:
    saved in the store only for its own rule and a complete trace), saying what it did."""
    from probes.head_impact import BinarizeRule, ensure_scored

    open_traced(store)
    attention = "mean-without-sinks" if exclude_sinks else "mean"
    rule = BinarizeRule(attention=attention, mask_threshold=mask_threshold, keep_best_token=keep_best, sink_tau=sink_tau)
    result = ensure_scored(store, rule)
    if result.note:
        err_console.print(result.note, highlight=False)
    return result.ds
