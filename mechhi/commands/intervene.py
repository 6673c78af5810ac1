"""The intervene stage's commands: `mechhi ablate` and `mechhi edit`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mechhi.commands.app import app
from mechhi.commands.common import (
    BatchSizeOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    concept_words,
    console,
    friendly_errors,
    print_json,
)
from probes.registry import probe_names

DefaultStoreOpt = Annotated[
    Path | None,
    typer.Option(
        "--store",
        "-s",
        help="Store whose probe scores pick the heads (default: where `mechhi trace` writes by default).",
    ),
]
SeedsOpt = Annotated[int, typer.Option(min=1, help="Random head sets per control: seeds 0..N-1.")]
EvalDatasetOpt = Annotated[
    Path | None,
    typer.Option(
        help="Evaluation dataset (default: held-out toy-world scenes, data/toy-heldout, built on first use)."
    ),
]
ThreadsOpt = Annotated[int | None, typer.Option(min=1, help="torch CPU threads (default: torch's choice).")]
EvalSplitOpt = Annotated[str, typer.Option(help="Split of the evaluation dataset.")]
StoreModelOpt = Annotated[str | None, typer.Option(help="Model (default: the store's).")]


def _words(text: str | None) -> tuple[str, ...] | None:
    return tuple(w.strip() for w in text.split(",") if w.strip()) if text else None


def _threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _layers(per_layer: dict[Any, int]) -> str:
    return " ".join(f"{layer}:{count}" for layer, count in per_layer.items()) or "-"


def _value(stat: dict[str, Any], signed: bool = True, times: bool = False) -> str:
    mean, se = stat.get("mean"), stat.get("se")
    if mean is None:
        return "n/a"
    shown = f"x{mean:.3g}" if times else _number(mean, signed)
    return shown if se is None else f"{shown} ± {se:.2g}"


def _number(value: float, signed: bool) -> str:
    """3 significant digits, but no more decimals than 3 for values below 1 (shares, accuracies)."""
    text = f"{value:+.3f}" if abs(value) < 1 else f"{value:+.3g}"
    return text if signed else text.lstrip("+")


def _spread(row: dict[str, Any], key: str = "change") -> str:
    """A random group's mean over seeds, its sd across seeds and how many seeds go as far as top."""
    seeds = row["seeds"]
    if row[key] is None:
        return "n/a"
    sd = "n/a" if seeds["sd"] is None else f"{seeds['sd']:.2g}"
    extreme = (
        ""
        if seeds.get("as_extreme") is None
        else f"; {round(seeds['as_extreme'] * seeds['n_seeds'])}/{seeds['n_seeds']}"
    )
    shown = _number(row[key], signed=True) if key == "change" else f"x{row[key]:.3g}"
    return f"{shown} (sd {sd}{extreme})"


@app.command()
@friendly_errors
def ablate(
    store: DefaultStoreOpt = None,
    probe: Annotated[
        str, typer.Option(help=f"Heads ranked by one of the probes: {', '.join(probe_names())}.")
    ] = "head-impact",
    n_heads: Annotated[
        int, typer.Option(min=1, help="Heads in each ablated set (top-N, bottom-N, random).")
    ] = 8,
    mode: Annotated[
        str,
        typer.Option(
            help="mean: replace each head's output by its mean over the store's samples; zero: set it to 0."
        ),
    ] = "mean",
    seeds: SeedsOpt = 5,
    controls: Annotated[
        str,
        typer.Option(
            help="Random controls, comma-separated: matched (same heads per layer), "
            "depth (same heads per depth bin)."
        ),
    ] = "matched,depth",
    dataset: EvalDatasetOpt = None,
    split: EvalSplitOpt = "test",
    limit: Annotated[int | None, typer.Option(min=2, help="Evaluation samples (default 100).")] = 100,
    words: Annotated[
        str | None,
        typer.Option(help="Concept words of the pursuit / logit-lens probes (default: the toy's colours)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Cache of finished setups and ablate.json.")] = Path(
        "experiments/ablate"
    ),
    model: StoreModelOpt = None,
    batch_size: BatchSizeOpt = 16,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ablate a probe's top heads against random heads: the causal test of a ranking.

    The probe's top-N and bottom-N heads and random sets with the same heads per layer
    (and per depth bin) are ablated one setup at a time; each row is the change of
    description perplexity, VQA accuracy and AnsProb against the unablated model.
    """
    from mechhi.intervene.ablate import AblateConfig, run_ablate

    _threads(threads)
    config = AblateConfig(
        store=str(store) if store else None,
        probe=probe,
        n_heads=n_heads,
        mode=mode,
        seeds=tuple(range(seeds)),
        controls=_words(controls) or (),
        dataset=str(dataset) if dataset else None,
        split=split,
        limit=limit,
        words=concept_words(words),
        out=str(out),
        model=model,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
    )
    report = run_ablate(config, progress=not as_json)
    if as_json:
        print_json(report)
        return
    print_ablation(report)


def print_ablation(report: dict[str, Any]) -> None:
    metrics = {"perplexity": "perplexity ↓", "vqa_accuracy": "VQA accuracy ↑", "ans_prob": "AnsProb ↑"}
    table = Table(
        title=f"Ablating {report['n_heads']} heads by {report['probe']} ({report['mode']} ablation), "
        f"{report['n_samples']} samples: {report['model']}"
    )
    for column in ("setup", "heads per layer", *metrics.values()):
        table.add_column(column, justify="right")
    base = report["setups"][0]
    table.add_row("unablated", "-", *(_value(base["metrics"][m], signed=False) for m in metrics))
    by_group = {(r["group"], r["metric"]): r for r in report["summary"]}
    for setup in report["setups"][1:3]:
        table.add_row(
            setup["name"], _layers(setup["per_layer"]), *(_value(setup["change"][m]) for m in metrics)
        )
    for group in report["config"]["controls"]:
        members = [s for s in report["setups"] if s["kind"] == group]
        layers = "as top" if group == "matched" else "per depth bin"
        table.add_row(
            f"{group} ({_seeds(len(members))})", layers, *(_spread(by_group[(group, m)]) for m in metrics)
        )
    console.print(table)
    console.print(
        "unablated: value ± SE; other rows: change against it ± paired SE; random rows: mean change over "
        "seeds (sd across seeds; seeds whose change goes at least as far as top's)."
    )


@app.command()
@friendly_errors
def edit(
    store: DefaultStoreOpt = None,
    concept: Annotated[
        str,
        typer.Option(
            help="Concept to edit: colour or shape (the toy world's words); the other is the control."
        ),
    ] = "colour",
    words: Annotated[
        str | None, typer.Option(help="The concept's words instead (comma-separated single tokens).")
    ] = None,
    control_words: Annotated[
        str | None,
        typer.Option(
            help="The control concept's words: required with --words (words the edit should leave alone)."
        ),
    ] = None,
    k: Annotated[
        int, typer.Option(min=1, help="Heads edited: the concept's top K by Head Pursuit (SOMP).")
    ] = 4,
    alpha: Annotated[
        float, typer.Option(help="Scale of the edited heads' outputs: -1 suppresses, > 1 enhances.")
    ] = -1.0,
    seeds: SeedsOpt = 5,
    images: Annotated[int, typer.Option(min=1, help="Held-out images captioned per setup.")] = 50,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Greedy caption length limit.")] = 16,
    dataset: EvalDatasetOpt = None,
    out: Annotated[Path, typer.Option(help="Cache of finished setups and edit.json.")] = Path(
        "experiments/edit"
    ),
    model: StoreModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Head Pursuit's editing experiment: scale a concept's top heads, count its words.

    The concept's top-K heads by SOMP are scaled by alpha; the concept's (and a control
    concept's) words are counted in greedy captions, against random head sets with the
    same heads per layer.
    """
    from mechhi.intervene.edit import EditConfig, run_edit

    _threads(threads)
    config = EditConfig(
        store=str(store) if store else None,
        concept=concept,
        words=_words(words),
        control_words=_words(control_words),
        k=k,
        alpha=alpha,
        seeds=tuple(range(seeds)),
        images=images,
        max_new_tokens=max_new_tokens,
        dataset=str(dataset) if dataset else None,
        out=str(out),
        model=model,
        device=device,
        dtype=dtype,
    )
    report = run_edit(config, progress=not as_json)
    if as_json:
        print_json(report)
        return
    print_edit(report)


def print_edit(report: dict[str, Any]) -> None:
    name = report["concept"] if report["concept"] != "words" else "concept"
    other = {"colour": "shape", "shape": "colour"}.get(name, "control")
    measures = {
        "concept": f"{name} words",
        "concept_precision": f"{name} right",
        "control": f"{other} words",
        "control_precision": f"{other} right",
    }
    table = Table(
        title=f"Editing the top {report['k']} {name} heads by Head Pursuit, alpha = {report['alpha']:g}, "
        f"{report['n_images']} images: {report['model']}"
    )
    for column in ("setup", "heads", *measures.values()):
        table.add_column(column, justify="right")
    base, top = report["setups"][0], report["setups"][1]
    table.add_row("unedited", "-", *(_value(base["metrics"][m], signed=False) for m in measures))
    table.add_row(
        top["name"],
        " ".join(f"{l}.{h}" for l, h in top["heads"]),
        *(
            _value(top["change"][m])
            if m.endswith("precision")
            else _value(top["ratio"][m], signed=False, times=True)
            for m in measures
        ),
    )
    rows = {(r["group"], r["measure"]): r for r in report["summary"]}
    matched = [s for s in report["setups"] if s["kind"] == "matched"]
    if matched:
        table.add_row(
            f"matched ({_seeds(len(matched))})",
            "as top",
            *(_spread(rows[("matched", m)], rows[("matched", m)]["seeds"]["of"]) for m in measures),
        )
    console.print(table)
    console.print(
        "words: per caption (unedited), times that (edited) ± delta-method SE; right: share of those words "
        "the image's own description has (unedited), its change (edited) ± paired SE; matched: mean over "
        "seeds (sd across seeds; seeds at least as far from no effect as top)."
    )
    examples = Table(title="First captions")
    for column in ("image", "unedited", top["name"]):
        examples.add_column(column)
    for before, after in zip(base["captions"], top["captions"]):
        examples.add_row(before["image_id"], before["generated"], after["generated"])
    console.print(examples)
