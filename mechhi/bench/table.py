"""`mechhi bench`'s report as tables, and the issue's targets checked against it.

Targets (docs: README, Performance): from 1024 visual tokens up, the capture within
1.10x of the floor in time and in peak memory; eager at least 5x the floor's memory at
4096+ tokens on full-depth configs (or not fitting); nnsight's fixed cost per trace
under 5% of a batch's forward at `mechhi trace`'s batch size.
"""

from __future__ import annotations

from typing import Any

from mechhi.bench.configs import config_named
from mechhi.bench.run import Cell, Report

CAPTURE_LIMIT = 1.10
CAPTURE_FROM = 1024  # visual tokens
EAGER_FACTOR = 5.0
EAGER_FROM = 4096
OVERHEAD_LIMIT = 0.05


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def _fixed(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _rate(cell: Cell, mode: str) -> str:
    rate = cell.samples_per_second(mode)
    return "-" if rate is None else f"{rate:.3g}"


def _extra(cell: Cell) -> str:
    """The capture's peak minus the floor's, MiB (negative: the stop before the last layer saved more)."""
    peaks = cell.peak_bytes
    return "-" if "capture" not in peaks else f"{(peaks['capture'] - peaks['floor']) / 2**20:+,.0f}"


def memory_ratio(cell: Cell, mode: str) -> float | None:
    peaks = cell.peak_bytes
    return peaks[mode] / peaks["floor"] if mode in peaks and peaks.get("floor") else None


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A pipe table: readable in a terminal, and pasted as is into a README."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def cells_table(report: Report) -> str:
    header = [
        "config",
        "layers",
        "batch",
        "visual tokens",
        "seq",
        "floor s",
        "capture time",
        "eager time",
        "floor peak MiB",
        "capture memory",
        "capture extra MiB",
        "eager memory",
        "capture samples/s",
    ]
    rows = []
    for c in report.cells:
        if c.eager_skipped:
            predicted = c.eager_predicted_bytes / c.peak_bytes["floor"] if c.eager_predicted_bytes else None
            eager_time, eager_memory = (
                "skipped",
                f"skipped: {c.eager_skipped} ({_times(predicted)} predicted)",
            )
        else:
            eager_time, eager_memory = _times(c.ratio.get("eager")), _times(memory_ratio(c, "eager"))
        rows.append(
            [
                c.config,
                str(c.layers),
                str(c.batch_size),
                str(c.visual_tokens),
                str(c.seq_len),
                _fixed(c.seconds.get("floor")),
                _times(c.ratio.get("capture")),
                eager_time,
                _mib(c.peak_bytes.get("floor")),
                _times(memory_ratio(c, "capture")),
                _extra(c),
                eager_memory,
                _rate(c, "capture"),
            ]
        )
    return markdown(header, rows)


def overhead_table(report: Report) -> str:
    header = [
        "config",
        "layers",
        "batch",
        "seq",
        "floor ms",
        "empty trace ms",
        "nnsight adds",
        "capture ms",
        "floor samples/s",
        "capture samples/s",
    ]
    rows = []
    for c in report.overhead:
        floor, empty = c.seconds.get("floor"), c.seconds.get("nnsight")
        adds = "-" if empty is None else f"{1000 * (empty - floor):+,.1f} ms ({c.ratio['nnsight'] - 1:+.1%})"
        rows.append(
            [
                c.config,
                str(c.layers),
                str(c.batch_size),
                str(c.seq_len),
                _ms(floor),
                _ms(empty),
                adds,
                _ms(c.seconds.get("capture")),
                _rate(c, "floor"),
                _rate(c, "capture"),
            ]
        )
    return markdown(header, rows)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:,.1f}"


def report_text(report: Report) -> str:
    """Everything `mechhi bench` prints: the tables, what they were measured with, the targets."""
    heading = (
        f"mechhi bench on {report.device} ({report.dtype}); time: {report.clock} (ratios: median of "
        f"per-round ratios to the floor); memory: {report.peak_kind} of each mode in its own process"
    )
    parts = [heading, "", cells_table(report)]
    if report.overhead:
        parts += [
            "",
            "nnsight's fixed cost per trace (an empty trace against the floor, on the narrow twin) and "
            "throughput at `mechhi trace`'s batch size:",
            "",
            overhead_table(report),
        ]
    parts += ["", *(f"- {v['status']}: {v['target']} ({v['detail']})" for v in targets(report))]
    return "\n".join(parts)


def targets(report: Report) -> list[dict[str, Any]]:
    """Each target with the figures it was judged on: met, not met, or not measured."""
    found = []
    big = [c for c in report.cells if c.visual_tokens >= CAPTURE_FROM]
    for what, values in (
        ("time", [c.ratio.get("capture") for c in big]),
        ("memory", [memory_ratio(c, "capture") for c in big]),
    ):
        worst = max((v for v in values if v is not None), default=None)
        found.append(
            _verdict(
                f"capture {what} <= {CAPTURE_LIMIT:.2f}x floor from {CAPTURE_FROM} visual tokens",
                worst,
                None if worst is None else worst <= CAPTURE_LIMIT,
                f"worst {_times(worst)}",
            )
        )
    deep = [
        c
        for c in report.cells
        if c.visual_tokens >= EAGER_FROM and c.layers == config_named(c.config).text.layers
    ]
    factors = [memory_ratio(c, "eager") or c.eager_predicted_bytes / c.peak_bytes["floor"] for c in deep]
    least = min(factors, default=None)
    fits = [c for c in deep if not c.eager_skipped]
    met = (
        None
        if least is None
        else all(f >= EAGER_FACTOR for f, c in zip(factors, deep) if not c.eager_skipped)
    )
    found.append(
        _verdict(
            f"eager >= {EAGER_FACTOR:.0f}x floor memory from {EAGER_FROM} tokens "
            "at full depth (or not fitting)",
            least,
            met,
            f"least {_times(least)}, {len(deep) - len(fits)} of {len(deep)} do not fit",
        )
    )
    share, detail = overhead_share(report)
    found.append(
        _verdict(
            f"nnsight's fixed cost < {OVERHEAD_LIMIT:.0%} of a batch's forward",
            share,
            None if share is None else share < OVERHEAD_LIMIT,
            detail,
        )
    )
    return found


def overhead_share(report: Report) -> tuple[float | None, str]:
    """nnsight's extra seconds per trace (empty trace minus floor, on the narrow twin) over
    the floor of the benchmarked config at the same batch: its share of a batch's forward."""
    narrow = next((c for c in report.overhead if "nnsight" in c.seconds), None)
    full = next((c for c in report.overhead if "nnsight" not in c.seconds and "floor" in c.seconds), None)
    if narrow is None or full is None:
        return None, "-"
    extra = narrow.seconds["nnsight"] - narrow.seconds["floor"]
    share = extra / full.seconds["floor"]
    return (
        share,
        f"{1000 * extra:+,.1f} ms per trace over a {1000 * full.seconds['floor']:,.0f} ms forward: "
        f"{share:+.2%}",
    )


def _verdict(target: str, value: float | None, met: bool | None, detail: str) -> dict[str, Any]:
    status = "not measured" if met is None else ("met" if met else "NOT met")
    return {"target": target, "value": value, "status": status, "detail": detail}
