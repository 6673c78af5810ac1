"""The experiment's tables: Table 4 (metric x setup, shift from original, the random-K
and depth-K spread over seeds), Table 5 (trainable parameters), the audit; as JSON, CSV
and text."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from mechhi.jsonfiles import write_json

METRICS = {  # name -> (label in the tables, higher is better)
    "vqa_accuracy": ("Accuracy ↑", True),
    "ans_prob": ("AnsProb ↑", True),
    "perplexity": ("Perplexity ↓", False),
}


def _group_value(entries: list[dict], metric: str) -> dict[str, Any]:
    """One Table 4 cell: a setup's mean ± se, or over seeds: mean of means, mean se, sd of means."""
    means = [e["metrics"][metric]["mean"] for e in entries]
    ses = [e["metrics"][metric]["se"] for e in entries]
    cell = {"mean": float(np.mean(means)), "se": float(np.mean(ses)), "n_seeds": len(entries)}
    cell["spread_sd"] = float(np.std(means, ddof=1)) if len(entries) > 1 else None
    return cell


def table4(entries: list[dict]) -> list[dict[str, Any]]:
    """Rows: metrics; per setup group its cell, the shift from original, and which shift is largest."""
    groups: dict[str, list[dict]] = {}
    for e in entries:
        groups.setdefault(e["group"], []).append(e)
    rows = []
    for metric, (label, higher) in METRICS.items():
        cells = {g: _group_value(es, metric) for g, es in groups.items()}
        base = cells.get("original")
        if base is not None:
            for cell in cells.values():
                cell["shift"] = cell["mean"] - base["mean"]
            others = {g: abs(c["shift"]) for g, c in cells.items() if g != "original"}
            largest = max(others, key=others.get) if others else None
        else:
            largest = None
        rows.append(
            {
                "metric": metric,
                "label": label,
                "higher_is_better": higher,
                "cells": cells,
                "largest_shift": largest,
            }
        )
    return rows


def table5(entries: list[dict]) -> list[dict[str, Any]]:
    return [
        {
            "setup": e["name"],
            "layers": e["layers"],
            "total": int(e["params"]["total"]),
            "trainable": int(e["params"]["trainable"]),
            "trainable_pct": e["params"]["trainable_pct"],
        }
        for e in entries
    ]


def audit_rows(entries: list[dict]) -> list[dict[str, Any]]:
    rows = []
    for e in entries:
        if e["spec"] is None:
            continue
        a, t = e["audit"], e["training"]
        rows.append(
            {
                "setup": e["name"],
                "layers": e["layers"],
                "steps": len(t["loss_curve"]),
                "first_loss": t["loss_curve"][0][1] if t["loss_curve"] else None,
                "last_loss": t["loss_curve"][-1][1] if t["loss_curve"] else None,
                "best_step": t["best_step"],
                "best_val_loss": t["best_val_loss"],
                "stopped_early": t["stopped_early"],
                "lora_B_norm": a["lora_B_norm"],
                "probe_shift": a["probe_max_abs_logit_shift"],
                "flags": a["flags"],
            }
        )
    return rows


def build_report(config: Any, model_id: str, dataset: str, entries: list[dict]) -> dict[str, Any]:
    """The whole report of an experiment (``config``: its ExperimentConfig dataclass)."""
    audits = audit_rows(entries)
    flagged = {r["setup"]: r["flags"] for r in audits if r["flags"]}
    notes = []
    for kind in ("random", "depth"):
        draws = [tuple(e["layers"]) for e in entries if e["group"].startswith(f"{kind}-")]
        if len(set(draws)) < len(draws):
            notes.append(
                f"{kind} seeds drew identical layer sets ({len(set(draws))} distinct of {len(draws)})"
            )
    return {
        "config": json.loads(json.dumps(asdict(config), default=str)),
        "model": model_id,
        "dataset": dataset,
        "setups": entries,
        "table4": table4(entries),
        "table5": table5(entries),
        "audit": audits,
        "flagged": flagged,
        "notes": notes,
    }


def write_tables(report: dict[str, Any], out: Path) -> None:
    """results.json (everything), table4.csv, table5.csv, audit.csv."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", report)
    with open(out / "table4.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["metric", "setup", "mean", "se", "spread_sd", "n_seeds", "shift_from_original", "largest_shift"]
        )
        for row in report["table4"]:
            for g, c in row["cells"].items():
                w.writerow(
                    [
                        row["metric"],
                        g,
                        c["mean"],
                        c["se"],
                        c["spread_sd"],
                        c["n_seeds"],
                        c.get("shift"),
                        g == row["largest_shift"],
                    ]
                )
    with open(out / "table5.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setup", "layers", "total", "trainable", "trainable_pct"])
        for r in report["table5"]:
            w.writerow(
                [r["setup"], " ".join(map(str, r["layers"])), r["total"], r["trainable"], r["trainable_pct"]]
            )
    with open(out / "audit.csv", "w", newline="") as f:
        w = csv.writer(f)
        keys = [
            "setup",
            "layers",
            "steps",
            "first_loss",
            "last_loss",
            "best_step",
            "best_val_loss",
            "stopped_early",
            "lora_B_norm",
            "probe_shift",
            "flags",
        ]
        w.writerow(keys)
        for r in report["audit"]:
            w.writerow(
                [
                    " ".join(map(str, r[k])) if k == "layers" else "; ".join(r[k]) if k == "flags" else r[k]
                    for k in keys
                ]
            )


def _cell_text(cell: dict[str, Any]) -> str:
    text = f"{cell['mean']:.4g} ± {cell['se']:.2g}"
    if cell.get("spread_sd") is not None:
        text += f" (sd {cell['spread_sd']:.2g}, {cell['n_seeds']} seeds)"
    return text


def print_report(report: dict[str, Any], console: Any) -> None:
    """Table 4 (largest shift from original in bold), Table 5, and the audit with its flags,
    on a rich ``console`` (the command's stdout: the tables are its result)."""
    from rich.table import Table

    groups = list(report["table4"][0]["cells"]) if report["table4"] else []
    t4 = Table(title="Table 4: metrics on the test split (bold: largest shift from original)")
    for name in ["metric", *groups]:
        t4.add_column(name, justify="right")
    for row in report["table4"]:
        texts = [_cell_text(row["cells"][g]) for g in groups]
        texts = [f"[bold]{t}[/bold]" if g == row["largest_shift"] else t for g, t in zip(groups, texts)]
        t4.add_row(row["label"], *texts)
    console.print(t4)
    t5 = Table(title="Table 5: trainable parameters")
    for name in ("setup", "layers", "total, #", "trainable, #", "trainable, %"):
        t5.add_column(name, justify="right")
    for r in report["table5"]:
        t5.add_row(
            r["setup"],
            ",".join(map(str, r["layers"])),
            f"{r['total']:,}",
            f"{r['trainable']:,}",
            f"{r['trainable_pct']:.4f}",
        )
    console.print(t5)
    ta = Table(title="Audit: did each evaluated model carry its trained adapter?")
    for name in ("setup", "loss first→last", "best val (step)", "‖lora_B‖", "probe shift", "flags"):
        ta.add_column(name)
    for r in report["audit"]:
        flags = "[red]" + "; ".join(r["flags"]) + "[/red]" if r["flags"] else "ok"
        ta.add_row(
            r["setup"],
            f"{r['first_loss']:.3f}→{r['last_loss']:.3f}",
            f"{r['best_val_loss']:.3f} ({r['best_step']})",
            f"{r['lora_B_norm']:.3g}",
            f"{r['probe_shift']:.3g}" if r["probe_shift"] is not None else "-",
            flags,
        )
    console.print(ta)
    for note in report["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")
