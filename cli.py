"""The `mechhi` command line: thin typer commands over mechhi/ and probes/.

Each command parses options, calls one engine function and prints. Library errors
(bad dataset, unknown model family, incompatible store, ...) become a one-line message
and exit code 1, never a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Find the attention heads of a vision-language model that look at key objects; fine-tune by them.",
)
dataset_app = typer.Typer(no_args_is_help=True, help="Build, inspect and validate key-object datasets.")
toy_app = typer.Typer(no_args_is_help=True, help="The bundled toy world: train and check the small model.")
app.add_typer(dataset_app, name="dataset")
app.add_typer(toy_app, name="toy")

console = Console()
err_console = Console(stderr=True)

StoreOpt = Annotated[Path, typer.Option("--store", "-s", help="Path of a mechhi zarr store.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")]
DtypeOpt = Annotated[str, typer.Option(help="auto | float32 | bfloat16")]
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
            text = str(error).strip()
            message = text.splitlines()[0] if text else type(error).__name__
            expected = isinstance(error, (ValueError, KeyError, FileNotFoundError, OSError))
            hint = "" if expected else f" ({type(error).__name__}; set MECHHI_DEBUG=1 for the traceback)"
            err_console.print(f"[red]error[/]: {message}{hint}", highlight=False)
            raise typer.Exit(1) from None

    return wrapper


def _finite(value: Any) -> float | None:
    """A float for JSON, or None where it is NaN (JSON has no NaN)."""
    number = float(value)
    return None if number != number else number


def print_json(payload: Any) -> None:
    from mechhi.store import json_default

    sys.stdout.write(json.dumps(payload, indent=2, default=json_default) + "\n")


# --------------------------------------------------------------------------- trace


@app.command()
@friendly_errors
def trace(
    model: ToyModelOpt = None,
    dataset: ToyDatasetOpt = None,
    store: Annotated[Optional[Path], typer.Option(help="Output store (default: stores/<dataset>.zarr).")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Trace only the first N samples.")] = None,
    batch_size: BatchSizeOpt = 4,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    no_maps: Annotated[bool, typer.Option("--no-maps", help="Keep masks and IoU only, not the attention cube.")] = False,
    template: Annotated[str, typer.Option(help="Prompt template: caption | vqa.")] = "caption",
    split: TraceSplitOpt = "auto",
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip invalid records (listed in the store attrs).")] = False,
) -> None:
    """Trace description-to-image attention of every head into a zarr store, then score it."""
    from mechhi.trace.job import TraceConfig, trace_dataset
    from probes.head_impact import layer_ranking, score_store

    defaults = TraceConfig()
    config = TraceConfig(
        model=model or defaults.model,
        dataset=str(dataset) if dataset else defaults.dataset,
        store=str(store) if store else None,
        limit=limit, batch_size=batch_size, device=device, dtype=dtype, maps=not no_maps,
        template=template, split=split, skip_bad=skip_bad,
    )  # fmt: skip
    path = trace_dataset(config, progress=True)
    scored = score_store(path)
    ranking = layer_ranking(scored)
    console.print(f"store: [bold]{path}[/]  samples: {scored.sizes['sample']}  "
                  f"best layer: {int(ranking.layer[0])} (mean HI {float(ranking[0]):.3f})")  # fmt: skip


# --------------------------------------------------------------------------- rank / stats


MaskThresholdOpt = Annotated[float, typer.Option(help="Binarised mask: token coverage >= this.")]
KeepBestOpt = Annotated[bool, typer.Option(help="An object below the threshold keeps its best-covered token.")]


def _open_traced(store: Path):
    """The store, refused if nothing is traced yet and warned about if only part is."""
    from mechhi.store import open_store

    ds = open_store(store)
    done, total = int(ds.done.sum()), ds.sizes["sample"]
    if done == 0:
        raise ValueError(f"{store}: no sample has been traced yet")
    if done < total:
        err_console.print(f"[yellow]warning[/]: only {done} of {total} samples are traced; scores cover those. "
                          "Rerun the same `mechhi trace` to finish.")  # fmt: skip
    return ds


def _scored(store: Path, mask_threshold: float = 0.5, keep_best: bool = True):
    """The store with head_impact under the asked binarisation rule.

    An unscored store is scored and the scores saved in it (said so). A store scored under
    another rule is rescored in memory only: rank and stats read, they do not replace the
    scores that other commands and users rely on (`probes.head_impact.score_store` does).
    """
    from mechhi.store import write_scores
    from probes.head_impact import BinarizeRule, score

    rule = BinarizeRule(mask_threshold=mask_threshold, keep_best_token=keep_best)
    ds = _open_traced(store)
    scored = "head_impact" in ds and not bool(ds.head_impact.isnull().all())
    if scored and ds.attrs.get("binarize") == rule.to_dict():
        return ds
    scores = score(ds, rule)
    if scored:
        err_console.print(f"scoring in memory ({rule.describe()}); the store keeps its own scores")
    else:
        err_console.print(f"scoring the store ({rule.describe()}) and saving the scores in it")
        write_scores(store, scores)
    merged = ds.drop_vars([name for name in scores.data_vars if name in ds]).merge(scores)
    merged.attrs = {**ds.attrs, **scores.attrs}
    return merged


PROBES = ("head-impact", "attention-mass")


@app.command()
@friendly_errors
def rank(
    store: StoreOpt,
    probe: Annotated[str, typer.Option(help="Scoring probe: head-impact, or attention-mass (soft baselines: "
                                            "layers by the object's share of image attention over its area share).")] = "head-impact",
    top: Annotated[Optional[int], typer.Option(min=1, help="Show only the K best layers.")] = None,
    mask_threshold: MaskThresholdOpt = 0.5,
    keep_best: KeepBestOpt = True,
    as_json: JsonOpt = False,
) -> None:
    """Rank layers by mean Head Impact over heads (best first), or by an attention-mass baseline."""
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; available: {', '.join(PROBES)}")
    if probe == "head-impact":
        from probes.head_impact import layer_ranking

        ds = _scored(store, mask_threshold, keep_best)
        ranking = layer_ranking(ds)
        columns = {"mean_hi": ranking}
        extra = {"binarize": ds.attrs.get("binarize")}
        title = "Head Impact"
    else:
        from probes.attention_mass import MEASURES, attention_mass, layer_means
        from probes.attention_mass import layer_ranking as mass_ranking

        ds = _open_traced(store)
        mass = attention_mass(ds)
        ranking, per_layer = mass_ranking(mass), layer_means(mass)  # means of an (S, L, H) array: cheap twice
        columns = {f"mean_{m}": per_layer[m].sel(layer=ranking.layer) for m in reversed(MEASURES)}
        extra, title = {}, "Attention mass (object lift = object share / object area share)"
    rows = [
        {"rank": i + 1, "layer": int(layer), "depth": float(ranking.depth[i]),
         **{name: _finite(values[i]) for name, values in columns.items()}}
        for i, layer in enumerate(ranking.layer.values)
    ]  # fmt: skip
    shown = rows[:top] if top else rows
    if as_json:
        print_json({"store": str(store), "model": ds.attrs.get("model"), "probe": probe, **extra,
                    "samples_done": int(ds.done.sum()), "n_layers": len(rows), "layers": shown})  # fmt: skip
        return
    table = Table(title=f"{title} by layer: {ds.attrs.get('model')}")
    headers = {"mean_hi": "mean HI", "mean_object_lift": "object lift", "mean_object_share": "object share",
               "mean_visual_mass": "visual mass"}  # fmt: skip
    for column in ("rank", "layer", "depth", *(headers[name] for name in columns)):
        table.add_column(column, justify="right")
    for row in shown:
        values = ["n/a" if row[name] is None else f"{row[name]:.4f}" for name in columns]
        table.add_row(str(row["rank"]), str(row["layer"]), f"{row['depth']:.2f}", *values)
    console.print(table)


@app.command()
@friendly_errors
def pursuit(
    model: ToyModelOpt = None,
    dataset: ToyDatasetOpt = None,
    words: Annotated[Optional[str], typer.Option(help="The concept: comma-separated single-token words (default: the toy world's colours).")] = None,
    k: Annotated[int, typer.Option(min=1, help="SOMP steps: concept atoms per head (at most the number of words).")] = 3,
    positions: Annotated[str, typer.Option(help="Average each head's write over the image tokens, or the answer (description) tokens.")] = "image",
    limit: Annotated[Optional[int], typer.Option(min=2, help="Use only the first N samples.")] = None,
    batch_size: BatchSizeOpt = 4,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    split: TraceSplitOpt = "auto",
    top: Annotated[int, typer.Option(min=1, help="Show the K heads whose writes the concept explains best.")] = 10,
    as_json: JsonOpt = False,
) -> None:
    """Head Pursuit (Basile et al. 2025): heads ranked by how much of their residual-stream
    write a few of the concept words' unembedding directions explain (SOMP)."""
    from mechhi.trace.pursuit_job import PursuitConfig, run_pursuit
    from probes.head_pursuit import head_ranking

    defaults = PursuitConfig()
    config = PursuitConfig(
        model=model or defaults.model, dataset=str(dataset) if dataset else defaults.dataset,
        words=tuple(w.strip() for w in words.split(",") if w.strip()) if words else defaults.words, k=k, positions=positions, limit=limit,
        batch_size=batch_size, device=device, dtype=dtype, split=split,
    )  # fmt: skip
    result = run_pursuit(config, progress=not as_json)
    ranking = head_ranking(result)
    rows = []
    for i in range(ranking.sizes["unit"]):
        layer, head = int(ranking["layer"][i]), int(ranking["head"][i])
        at = result.sel(layer=layer, head=head)
        rows.append({"rank": i + 1, "layer": layer, "head": head, "explained": _finite(at.explained),
                     "explained_random": _finite(at.explained_random), "top_word": str(at.top_word.values)})  # fmt: skip
    if as_json:
        print_json({"model": config.model, "dataset": config.dataset, "words": list(config.words), "k": config.k,
                    "positions": config.positions, "samples": result.attrs["samples"], "heads": rows[:top]})  # fmt: skip
        return
    table = Table(title=f"Head Pursuit of {', '.join(config.words)} (k={config.k}, {config.positions} tokens)")
    for column in ("rank", "layer", "head", "explained variance", "by random atoms", "top word"):
        table.add_column(column, justify="right")
    for row in rows[:top]:
        shown = ["n/a" if row[key] is None else f"{row[key]:.3f}" for key in ("explained", "explained_random")]
        table.add_row(str(row["rank"]), str(row["layer"]), str(row["head"]), *shown, row["top_word"])
    console.print(table)
    console.print("by random atoms: the same pursuit on as many random directions, the chance reference.")


@app.command()
@friendly_errors
def stats(
    store: StoreOpt, mask_threshold: MaskThresholdOpt = 0.5, keep_best: KeepBestOpt = True, as_json: JsonOpt = False
) -> None:
    """Kruskal-Wallis tests of Head Impact across layers and across heads."""
    from probes.head_impact import kruskal_records, kruskal_wallis

    ds = _scored(store, mask_threshold, keep_best)
    tests = kruskal_records(kruskal_wallis(ds))
    if as_json:
        print_json({"store": str(store), "model": ds.attrs.get("model"), "kruskal_wallis": tests})
        return
    table = Table(title="Kruskal-Wallis")
    for column in ("across", "on", "statistic", "df", "p-value"):
        table.add_column(column, justify="right")
    for t in tests:
        statistic, p = t["statistic"], t["p_value"]
        shown_p = "n/a" if p is None else (f"[bold green]{p:.3g}[/]" if p < 0.001 else f"{p:.3g}")
        if p == 0.0:
            shown_p = "[bold green]< 1e-300[/]"  # below float range, not zero
        shown_stat = "n/a" if statistic is None else f"{statistic:.2f}"
        table.add_row(t["across"], t["on"], shown_stat, str(t["df"]), shown_p)
    console.print(table)
    console.print("p < 0.001 in green. n/a: fewer than two non-empty groups or all values equal.")


# --------------------------------------------------------------------------- plot


@app.command()
@friendly_errors
def plot(
    kind: Annotated[str, typer.Argument(help="heatmap | layers | overlay | compare")],
    store: Annotated[list[Path], typer.Option("--store", "-s", help="Store(s); compare takes several.")],
    out: Annotated[Path, typer.Option(help="Output PNG.")],
    sample: Annotated[int, typer.Option(help="overlay: sample index.")] = 0,
    layer: Annotated[Optional[int], typer.Option(help="overlay: layer (default: the best by mean HI).")] = None,
    head: Annotated[Optional[int], typer.Option(help="overlay: head (default: the best in that layer).")] = None,
) -> None:
    """Figures: HI heatmap, HI by layer, one head's map over its image, models compared by depth."""
    from mechhi import plots
    from mechhi.store import open_store

    stores = [open_store(s) for s in store]
    if kind != "compare" and len(stores) != 1:
        raise ValueError(f"plot {kind} takes one --store")
    if kind == "heatmap":
        path = plots.plot_heatmap(stores[0], out)
    elif kind == "layers":
        path = plots.plot_layers(stores[0], out)
    elif kind == "overlay":
        from probes.head_impact import layer_ranking

        ds = stores[0] if "head_impact" in stores[0] else _scored(store[0])  # an unscored store: score it as `rank` would
        layer = int(layer_ranking(ds).layer[0]) if layer is None else layer
        head = int(ds.head_impact.sel(layer=layer).idxmax()) if head is None else head
        path = plots.plot_overlay(ds, out, sample=sample, layer=layer, head=head)
    elif kind == "compare":
        path = plots.plot_compare(stores, out)
    else:
        raise ValueError(f"unknown plot {kind!r}; choose heatmap, layers, overlay or compare")
    console.print(f"figure written to {path}")


# --------------------------------------------------------------------------- dataset


@dataset_app.command("build")
@friendly_errors
def dataset_build(
    source: Annotated[str, typer.Option(help="synthetic | paper | coco | grounding")],
    out: Annotated[Path, typer.Option(help="Output dataset directory.")],
    images: Annotated[Optional[Path], typer.Option(help="Image folder (paper: COCO val2017; coco; grounding).")] = None,
    paper_dir: Annotated[Optional[Path], typer.Option(help="paper: folder with dataset_masks.json and masks/.")] = None,
    instances: Annotated[Optional[Path], typer.Option(help="coco: instances_*.json.")] = None,
    captions: Annotated[Optional[Path], typer.Option(help="coco: captions_*.json; grounding: JSON {file: caption}.")] = None,
    n_images: Annotated[int, typer.Option(min=1, help="synthetic: number of images.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed for generation and splits.")] = 0,
    min_score: Annotated[float, typer.Option(help="paper/grounding: minimum SAM2 mask score.")] = 0.85,
    min_area: Annotated[float, typer.Option(help="coco: minimum object area in pixels.")] = 1024.0,
    categories: Annotated[Optional[str], typer.Option(help="coco: comma-separated category names to keep.")] = None,
    florence: Annotated[Optional[str], typer.Option(help="grounding: Florence-2 id or directory.")] = None,
    sam: Annotated[Optional[str], typer.Option(help="grounding: SAM2 id or directory.")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="grounding: process at most N images.")] = None,
    splits: Annotated[bool, typer.Option(help="Assign the paper's trace/train/val/test splits by image.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Start over instead of resuming into an existing --out.")] = False,
) -> None:
    """Build a key-object dataset in mechhi's format (resumes into an existing --out)."""
    report: Any
    if source == "synthetic":
        from mechhi.data.synthetic import build_synthetic

        report = build_synthetic(out, n_images=n_images, seed=seed, overwrite=overwrite)
    elif source == "paper":
        from mechhi.data.paper import build_from_paper

        report = build_from_paper(_paper_dir(paper_dir), _required(images, "--images"), out,
                                  min_mask_score=min_score, overwrite=overwrite)  # fmt: skip
    elif source == "coco":
        from mechhi.data.coco import build_from_coco

        names = [c.strip() for c in categories.split(",")] if categories else None
        report = build_from_coco(_required(instances, "--instances"), _required(images, "--images"), out,
                                 captions_json=captions, min_area=min_area, categories=names,
                                 overwrite=overwrite)  # fmt: skip
    elif source == "grounding":
        from mechhi.data.grounding import GroundingConfig, build_from_images

        config = GroundingConfig(min_score=min_score, **{k: v for k, v in (("florence", florence), ("sam", sam)) if v})
        caption_map = json.loads(captions.read_text()) if captions else None
        report = build_from_images(_required(images, "--images"), out, config=config, captions=caption_map,
                                   limit=limit, overwrite=overwrite)  # fmt: skip
    else:
        raise ValueError(f"unknown --source {source!r}; choose synthetic, paper, coco or grounding")
    if splits and source != "synthetic":
        from mechhi.data.splits import write_splits

        console.print(str(report))
        console.print(str(write_splits(out, seed=seed)))
    else:
        console.print(str(report) if not isinstance(report, Path) else f"dataset written to {report}")


def _paper_dir(given: Optional[Path]) -> Path:
    """--paper-dir, else $MECHHI_PAPER_DATA, else the copy beside a development checkout."""
    for candidate in (given, os.environ.get("MECHHI_PAPER_DATA"),
                      Path(__file__).resolve().parent.parent / "shared" / "data" / "sergeev2025"):  # fmt: skip
        if candidate and (Path(candidate) / "dataset_masks.json").is_file():
            return Path(candidate)
    raise ValueError("the paper's dataset_masks.json was not found: pass --paper-dir DIR (the published folder)")


def _required(value: Optional[Path], flag: str) -> Path:
    if value is None:
        raise ValueError(f"this source needs {flag}")
    return value


@dataset_app.command("check")
@friendly_errors
def dataset_check(directory: Annotated[Path, typer.Argument(help="Dataset directory.")], as_json: JsonOpt = False) -> None:
    """Validate a dataset; list every bad record; exit 1 if there is any."""
    from mechhi.data.format import check_dataset, load_dataset

    problems = check_dataset(directory)
    if as_json:
        print_json({"dataset": str(directory), "problems": [p.message for p in problems]})
    else:
        ds = load_dataset(directory, skip_bad=True)
        console.print(f"{ds.root}: {len(ds.records)} images, {len(ds.samples)} usable objects")
        for problem in problems:
            console.print(f"[red]bad[/] {problem.message}", highlight=False)
        console.print("[green]no problems[/]" if not problems else f"[red]{len(problems)} problem(s)[/]")
    if problems:
        raise typer.Exit(1)


@dataset_app.command("show")
@friendly_errors
def dataset_show(
    directory: Annotated[Path, typer.Argument(help="Dataset directory.")],
    png: Annotated[Optional[Path], typer.Option(help="Write a contact sheet of samples with masks here.")] = None,
    n: Annotated[int, typer.Option(min=1, help="Samples on the contact sheet.")] = 8,
    seed: Annotated[int, typer.Option(help="Which samples to draw.")] = 0,
) -> None:
    """Counts per split, an object-size histogram, and a contact sheet of samples."""
    import numpy as np

    from mechhi.data.format import load_dataset
    from mechhi.plots import sample_sheet

    ds = load_dataset(directory, skip_bad=True)
    console.print(f"{ds.root}: {len(ds.records)} images, {len(ds.samples)} objects, {len(ds.skipped)} skipped")
    for split, count in sorted(ds.split_counts().items(), key=lambda kv: str(kv[0])):
        console.print(f"  split {split or '-'}: {count} images")
    fractions = np.array([s.mask().mean() for s in ds.samples])
    edges = [0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    counts, _ = np.histogram(fractions, bins=edges)
    console.print("object area (fraction of the image):")
    for lo, hi, count in zip(edges[:-1], edges[1:], counts):
        bar = "#" * int(round(40 * count / max(1, counts.max())))
        console.print(f"  {lo:>5.3f}-{hi:<5.3f} {count:>6} {bar}")
    if png:
        rng = np.random.default_rng(seed)
        chosen = rng.choice(len(ds.samples), size=min(n, len(ds.samples)), replace=False)
        console.print(f"samples drawn to {sample_sheet([ds.samples[i] for i in sorted(chosen)], png)}")


# --------------------------------------------------------------------------- fine-tuning


@app.command()
@friendly_errors
def finetune(
    store: Annotated[Optional[Path], typer.Option(help="Scored store whose Head Impact ranking picks the layers.")] = Path("stores/toy.zarr"),
    select: Annotated[str, typer.Option(help="top-K | bottom-K | random-K | full | layers=3,7")] = "top-4",
    out: Annotated[Optional[Path], typer.Option(help="Adapter directory (default: adapters/<store>-<select>).")] = None,
    dataset: Annotated[Optional[Path], typer.Option(help="Dataset with train/val splits (default: toy fine-tuning set).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Base model (default: the store's model).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random-K draw.")] = 0,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="Optimizer steps.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Train LoRA (r=8, alpha=16, q/k/v) on the decoder layers chosen from the store's ranking."""
    from dataclasses import replace

    from mechhi.finetune import FinetuneConfig, TrainSettings
    from mechhi.finetune import finetune as run_finetune

    train = replace(TrainSettings(), **({"max_steps": max_steps} if max_steps else {}))
    config = FinetuneConfig(store=str(store) if store else None, select=select, out=str(out) if out else None,
                            dataset=str(dataset) if dataset else None, model=model, select_seed=seed,
                            device=device, dtype=dtype, train=train)  # fmt: skip
    summary = run_finetune(config).summary()
    if as_json:
        print_json(summary)
    else:
        console.print(f"adapter: [bold]{summary['out']}[/]  layers {summary['layers']}  "
                      f"best val loss {summary['best_val_loss']:.4f} at step {summary['best_step']}  "
                      f"trainable {summary['params']}")  # fmt: skip


@app.command()
@friendly_errors
def evaluate(
    model: Annotated[Optional[str], typer.Option(help="Base model (default: the adapter's base, else the toy).")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="LoRA adapter directory from `mechhi finetune`.")] = None,
    dataset: Annotated[Optional[Path], typer.Option(help="Dataset (default: toy fine-tuning set).")] = None,
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    limit: Annotated[Optional[int], typer.Option(min=1, help="Evaluate at most N samples.")] = 200,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Perplexity over answer tokens, closed-ended VQA accuracy and AnsProb, with standard errors."""
    from dataclasses import replace

    from mechhi.experiment import EvalSettings, EvaluateConfig, run_evaluate

    config = EvaluateConfig(model=model, adapter=str(adapter) if adapter else None,
                            dataset=str(dataset) if dataset else None, split=split, device=device, dtype=dtype,
                            eval=replace(EvalSettings(), limit=limit))  # fmt: skip
    result = run_evaluate(config)
    if as_json:
        print_json(result)
        return
    table = Table(title=f"evaluation on {split}")
    table.add_column("metric")
    table.add_column("mean ± SE", justify="right")
    for name, metric in result.get("metrics", {}).items():
        if isinstance(metric, dict) and "mean" in metric:
            table.add_row(name, f"{metric['mean']:.4f} ± {metric['se']:.4f}")
    console.print(table)
    for line in result.get("metrics", {}).get("generations", [])[:5]:
        console.print(f"  {line}")


@app.command()
@friendly_errors
def experiment(
    model: Annotated[Optional[str], typer.Option(help="Base model (default: the store's model).")] = None,
    store: Annotated[Path, typer.Option(help="Scored store whose ranking picks the layers.")] = Path("stores/toy.zarr"),
    dataset: Annotated[Optional[Path], typer.Option(help="Dataset with train/val/test (default: toy set).")] = None,
    k: Annotated[int, typer.Option(min=1, help="Layers per setup (top-K, bottom-K, random-K).")] = 3,
    seeds: Annotated[int, typer.Option(min=1, help="Random-K draws (mean and spread).")] = 3,
    out: Annotated[Path, typer.Option(help="Results directory.")] = Path("experiments/toy"),
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """The paper's comparison: original / top-K / bottom-K / random-K / full (Tables 4 and 5)."""
    from mechhi.experiment import ExperimentConfig, run_experiment

    config = ExperimentConfig(store=str(store), model=model, dataset=str(dataset) if dataset else None,
                              out=str(out), k=k, random_seeds=tuple(range(seeds)), device=device,
                              dtype=dtype)  # fmt: skip
    run_experiment(config)
    console.print(f"results: {out}/results.json, table4.csv, table5.csv, audit.csv")


# --------------------------------------------------------------------------- toy


@toy_app.command("train")
@friendly_errors
def toy_train(
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default: mechhi/zoo/toy-qwen2vl).")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Language-phase steps (default 700; the vision phase adds 600 before them).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and data.")] = 0,
) -> None:
    """Train the toy Qwen2-VL on the synthetic world (2 CPU cores; resumes from its checkpoint)."""
    from dataclasses import replace

    from mechhi.zoo.toy import TOY_DIR, ToyConfig, train

    config = replace(ToyConfig(), seed=seed, **({"steps": steps} if steps else {}))
    console.print(f"model written to {train(config, out_dir=out or TOY_DIR)}")


@toy_app.command("card")
@friendly_errors
def toy_card(
    model_dir: Annotated[Optional[Path], typer.Option("--model", help="Trained toy model directory.")] = None,
    n_images: Annotated[int, typer.Option(min=10, help="Held-out scenes for the quality metrics.")] = 200,
) -> None:
    """Measure the toy model on held-out scenes and write its model card (README.md, metrics.json)."""
    from mechhi.zoo.toy import TOY_DIR, card_metrics, write_card

    directory = model_dir or TOY_DIR
    console.print(f"model card written to {write_card(card_metrics(directory, n_images=n_images), directory)}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
