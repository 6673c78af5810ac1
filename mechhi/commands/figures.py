"""`mechhi plot` (figures of stores and experiments) and `mechhi report` (one HTML page).

Both print only the written path on stdout; scoring messages go to stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mechhi.commands.app import app
from mechhi.commands.common import friendly_errors, scored

KINDS = ("heatmap", "layers", "overlay", "compare", "results")
OVERLAY_ONLY = ("sample", "layer", "head", "top")

StoresOpt = Annotated[
    list[Path] | None,
    typer.Option("--store", "-s", help="Store(s); heatmap, layers and compare take several."),
]
ExperimentOpt = Annotated[
    Path | None,
    typer.Option(
        help="A result folder or file: `mechhi experiment`'s results.json, "
        "`mechhi ablate`'s ablate.json or `mechhi edit`'s edit.json."
    ),
]
ResultsOpt = Annotated[
    Path | None, typer.Option(help="plot results: a result file (or folder), of any kind --experiment takes.")
]
LabelsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--label",
        help="A name for each --store, in order (legends, "
        "panels, the report); default: the model's short name.",
    ),
]
DpiOpt = Annotated[int, typer.Option(min=10, max=1200, help="Dots per inch (PNG; raster parts of SVG/PDF).")]


def _check_options(kind: str, stores: list[Path], experiment: Path | None, given: dict[str, object]) -> None:
    """Refuse options that the figure kind does not take, in one line naming them."""
    if kind not in KINDS:
        raise ValueError(f"unknown plot {kind!r}; choose {', '.join(KINDS)}")
    stray = [f"--{name}" for name in OVERLAY_ONLY if given[name] is not None and kind != "overlay"]
    if stray:
        raise ValueError(
            f"{', '.join(stray)} {'applies' if len(stray) == 1 else 'apply'} to `plot overlay` only"
        )
    if kind == "results":
        if experiment is None or stores:
            raise ValueError("plot results takes --experiment DIR (or --results FILE) and no --store")
        return
    if experiment is not None:
        raise ValueError("--experiment and --results apply to `plot results` only")
    if not stores:
        raise ValueError(f"plot {kind} needs --store")
    if kind == "overlay" and len(stores) != 1:
        raise ValueError("plot overlay takes one --store")
    if kind == "compare" and len(stores) < 2:
        raise ValueError("plot compare takes two or more --store")


def _overlay(ds, sample: int | None, layer: int | None, head: int | None, top: int | None, label: str | None):
    from mechhi import figures

    sample = 0 if sample is None else sample
    if top is None:
        layer, head = figures.choose_head(ds, layer, head)
        return figures.overlay_figure(ds, sample=sample, layer=layer, head=head, label=label)
    if layer is not None or head is not None:
        raise ValueError("--top draws the best heads itself: give it without --layer/--head")
    return figures.top_heads_figure(ds, sample=sample, n=top, label=label)


def _labels(labels: list[str] | None, stores: list[Path]) -> list[str] | None:
    """The user's --label values, one per --store (checked), or None for the default labels."""
    from mechhi.store.labels import check_labels

    return None if not labels else check_labels(labels, len(stores), "--label")


def _scored(stores: list[Path]) -> list:
    """Each store scored (as `rank` would), keeping where it came from for its label."""
    datasets = [scored(s) for s in stores]
    for ds, path in zip(datasets, stores):
        ds.encoding.setdefault("source", str(path))
    return datasets


@app.command()
@friendly_errors
def plot(
    kind: Annotated[str, typer.Argument(help="heatmap | layers | overlay | compare | results")],
    out: Annotated[Path, typer.Option(help="Output file: .png, .svg or .pdf.")],
    store: StoresOpt = None,
    label: LabelsOpt = None,
    experiment: ExperimentOpt = None,
    results: ResultsOpt = None,
    dpi: DpiOpt = 150,
    sample: Annotated[int | None, typer.Option(help="overlay: sample index (default 0).")] = None,
    layer: Annotated[int | None, typer.Option(help="overlay: layer (default: the best by mean HI).")] = None,
    head: Annotated[int | None, typer.Option(help="overlay: head (default: the best in that layer).")] = None,
    top: Annotated[
        int | None, typer.Option(min=1, help="overlay: draw the N heads of highest HI as a grid.")
    ] = None,
) -> None:
    """Figures: HI heatmap (Fig. 4), HI per layer and head (Fig. 5), a head's attention over its image,
    models compared by relative depth, an experiment's, ablation's or edit's metrics per setup."""
    from mechhi import figures

    stores = list(store or [])
    if experiment is not None and results is not None:
        raise ValueError("give --experiment or --results, not both")
    experiment = experiment or results
    _check_options(kind, stores, experiment, {"sample": sample, "layer": layer, "head": head, "top": top})
    figures.style.figure_format(out)  # a bad extension fails before any work
    if kind == "results":
        if label:
            raise ValueError("--label names --store stores: `plot results` takes none")
        fig = figures.results_figure(figures.load_results(experiment))
    else:
        labels = _labels(label, stores)  # before any store is scored
        datasets = _scored(stores)
        draw = {
            "heatmap": figures.heatmap_figure,
            "layers": figures.layers_figure,
            "compare": figures.compare_figure,
        }
        if kind == "overlay":
            fig = _overlay(datasets[0], sample, layer, head, top, labels[0] if labels else None)
        else:
            fig = draw[kind](datasets, labels=labels)
    typer.echo(str(figures.save(fig, out, dpi=dpi)))


def _article(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _routed(experiment: Path | None, ablate: Path | None, edit: Path | None) -> dict[str, Path | None]:
    """--experiment may be any result: an ablation or edit result there goes where --ablate / --edit would."""
    from mechhi.figures import read_result

    routed = {"experiment": experiment, "ablation": ablate, "edit": edit}
    if experiment is not None:
        kind, _, _ = read_result(experiment)
        if kind == "table":
            raise ValueError(
                f"--experiment {experiment}: a generic result table; the report shows it with `plot results`"
            )
        if kind != "experiment":
            if routed[kind] is not None:
                raise ValueError(
                    f"--experiment {experiment} is {_article(kind)} result, "
                    f"and --{'ablate' if kind == 'ablation' else kind} gives one too"
                )
            routed = {**routed, "experiment": None, kind: experiment}
    return routed


def _agreements(files: list[Path]) -> list[tuple[Path, dict]]:
    """Each `rank --compare-probes --json` result, checked to be one."""
    import json

    loaded = []
    for file in files:
        try:
            payload = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"--agreement {file}: {type(err).__name__}: {err}") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("pairs"), list):
            raise ValueError(
                f"--agreement {file}: not the output of `mechhi rank --compare-probes --json` (no 'pairs')"
            )
        loaded.append((file, payload))
    return loaded


@app.command()
@friendly_errors
def report(
    out: Annotated[Path, typer.Option(help="Output folder; the page is written as OUT/index.html.")],
    store: StoresOpt = None,
    label: LabelsOpt = None,
    experiment: ExperimentOpt = None,
    ablate: Annotated[
        Path | None, typer.Option(help="A `mechhi ablate` output folder (its ablate.json) or the file.")
    ] = None,
    edit: Annotated[
        Path | None, typer.Option(help="A `mechhi edit` output folder (its edit.json) or the file.")
    ] = None,
    pursuit: Annotated[
        Path | None, typer.Option(help="Head Pursuit result: the output of `mechhi pursuit --json`.")
    ] = None,
    agreement: Annotated[
        list[Path] | None,
        typer.Option(
            help="Probe agreement with pursuit and the logit lens: the "
            "output of `mechhi rank --compare-probes --json`."
        ),
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Statistics: K of the bootstrap's top-K shares.")] = 3,
    n_resamples: Annotated[int, typer.Option(min=100, help="Statistics: bootstrap resamples.")] = 2000,
    samples: Annotated[int, typer.Option(min=1, help="Gallery: samples (spread over the store).")] = 6,
    heads: Annotated[int, typer.Option(min=1, help="Gallery: heads of highest HI per sample.")] = 4,
) -> None:
    """One self-contained HTML page: provenance, ranking, statistics, probes and their agreement, figures,
    gallery, and the experiment's, ablation's and edit's results."""
    import json

    from mechhi.figures import model_labels
    from mechhi.report import ReportInput, StoreEntry, build_report

    if not store:
        raise ValueError("report needs --store (one or more)")
    labels = _labels(label, store)
    results = _routed(experiment, ablate, edit)
    agreements = _agreements(list(agreement or []))
    datasets = _scored(store)
    names = labels or model_labels(datasets)
    entries = [StoreEntry(name, path, ds) for name, path, ds in zip(names, store, datasets)]
    pursued = json.loads(pursuit.read_text()) if pursuit else None
    page = build_report(
        ReportInput(
            entries,
            experiment=results["experiment"],
            pursuit=pursued,
            ablate=results["ablation"],
            edit=results["edit"],
            agreement=agreements,
            top_k=top_k,
            n_resamples=n_resamples,
            gallery_samples=samples,
            gallery_heads=heads,
        ),
        out,
    )
    typer.echo(str(page))
