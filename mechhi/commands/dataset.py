"""`mechhi dataset build | check | show`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from mechhi.commands.app import dataset_app
from mechhi.commands.common import JsonOpt, console, friendly_errors, print_json


@dataset_app.command("build")
@friendly_errors
def dataset_build(
    source: Annotated[str, typer.Option(help="synthetic | paper | coco | grounding")],
    out: Annotated[Path, typer.Option(help="Output dataset directory.")],
    images: Annotated[
        Path | None, typer.Option(help="Image folder (paper: COCO val2017; coco; grounding).")
    ] = None,
    paper_dir: Annotated[
        Path | None, typer.Option(help="paper: folder with dataset_masks.json and masks/.")
    ] = None,
    instances: Annotated[Path | None, typer.Option(help="coco: instances_*.json.")] = None,
    captions: Annotated[
        Path | None, typer.Option(help="coco: captions_*.json; grounding: JSON {file: caption}.")
    ] = None,
    n_images: Annotated[int, typer.Option(min=1, help="synthetic: number of images.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed for generation and splits.")] = 0,
    min_score: Annotated[float, typer.Option(help="paper/grounding: minimum SAM2 mask score.")] = 0.85,
    min_area: Annotated[float, typer.Option(help="coco: minimum object area in pixels.")] = 1024.0,
    categories: Annotated[
        str | None, typer.Option(help="coco: comma-separated category names to keep.")
    ] = None,
    florence: Annotated[str | None, typer.Option(help="grounding: Florence-2 id or directory.")] = None,
    sam: Annotated[str | None, typer.Option(help="grounding: SAM2 id or directory.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="grounding: process at most N images.")] = None,
    splits: Annotated[
        bool, typer.Option(help="Assign the paper's trace/train/val/test splits by image.")
    ] = True,
    overwrite: Annotated[
        bool, typer.Option(help="Start over instead of resuming into an existing --out.")
    ] = False,
) -> None:
    """Build a key-object dataset in mechhi's format (resumes into an existing --out)."""
    report: Any
    if source == "synthetic":
        from mechhi.data.synthetic import build_synthetic

        report = build_synthetic(out, n_images=n_images, seed=seed, overwrite=overwrite)
    elif source == "paper":
        from mechhi.data.paper import build_from_paper

        report = build_from_paper(
            _paper_dir(paper_dir),
            _required(images, "--images"),
            out,
            min_mask_score=min_score,
            overwrite=overwrite,
        )
    elif source == "coco":
        from mechhi.data.coco import build_from_coco

        names = [c.strip() for c in categories.split(",")] if categories else None
        report = build_from_coco(
            _required(instances, "--instances"),
            _required(images, "--images"),
            out,
            captions_json=captions,
            min_area=min_area,
            categories=names,
            overwrite=overwrite,
        )
    elif source == "grounding":
        from mechhi.data.grounding import GroundingConfig, build_from_images

        config = GroundingConfig(
            min_score=min_score, **{k: v for k, v in (("florence", florence), ("sam", sam)) if v}
        )
        caption_map = json.loads(captions.read_text()) if captions else None
        report = build_from_images(
            _required(images, "--images"),
            out,
            config=config,
            captions=caption_map,
            limit=limit,
            overwrite=overwrite,
        )
    else:
        raise ValueError(f"unknown --source {source!r}; choose synthetic, paper, coco or grounding")
    if splits and source != "synthetic":
        from mechhi.data.splits import write_splits

        console.print(str(report))
        console.print(str(write_splits(out, seed=seed)))
    else:
        console.print(str(report) if not isinstance(report, Path) else f"dataset written to {report}")


def _paper_dir(given: Path | None) -> Path:
    """--paper-dir, else $MECHHI_PAPER_DATA: the paper's published folder."""
    for candidate in (given, os.environ.get("MECHHI_PAPER_DATA")):
        if candidate and (Path(candidate) / "dataset_masks.json").is_file():
            return Path(candidate)
    raise ValueError(
        "the paper's dataset_masks.json was not found: pass --paper-dir DIR (the published folder)"
    )


def _required(value: Path | None, flag: str) -> Path:
    if value is None:
        raise ValueError(f"this source needs {flag}")
    return value


@dataset_app.command("check")
@friendly_errors
def dataset_check(
    directory: Annotated[Path, typer.Argument(help="Dataset directory.")],
    model: Annotated[
        str | None,
        typer.Option(
            help="Check image sizes against this model's processor "
            "(HF id or directory; default: the bundled toy)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate a dataset (every image decoded, its size asked of the model's processor);
    list every bad record and every note (e.g. an EXIF-rotated or a very large image);
    exit 1 if any record is bad."""
    from mechhi.bundled import BUNDLED_MODEL_ID
    from mechhi.data.format import load_dataset
    from mechhi.models.loading import load_adapter

    model = model or BUNDLED_MODEL_ID
    ds = load_dataset(directory, skip_bad=True, use=load_adapter(model))
    problems, notes = ds.skipped, ds.notes
    if as_json:
        print_json(
            {
                "dataset": str(directory),
                "model": model,
                "images": len(ds.records),
                "samples": len(ds.samples),
                "problems": [p.message for p in problems],
                "notes": [n.message for n in notes],
            }
        )
    else:
        console.print(
            f"{ds.root}: {len(ds.records)} images, {len(ds.samples)} usable objects "
            f"(sizes checked against {model}'s processor)",
            highlight=False,
        )
        for problem in problems:
            console.print(f"[red]bad[/] {problem.message}", highlight=False)
        for note in notes:
            console.print(f"[yellow]note[/] {note.message}", highlight=False)
        console.print("[green]no problems[/]" if not problems else f"[red]{len(problems)} problem(s)[/]")
    if problems:
        raise typer.Exit(1)


@dataset_app.command("show")
@friendly_errors
def dataset_show(
    directory: Annotated[Path, typer.Argument(help="Dataset directory.")],
    png: Annotated[
        Path | None, typer.Option(help="Write a contact sheet of samples with masks here.")
    ] = None,
    n: Annotated[int, typer.Option(min=1, help="Samples on the contact sheet.")] = 8,
    seed: Annotated[int, typer.Option(help="Which samples to draw.")] = 0,
) -> None:
    """Counts per split, an object-size histogram, and a contact sheet of samples."""
    import numpy as np

    from mechhi.data.format import load_dataset
    from mechhi.figures import sample_sheet

    ds = load_dataset(directory, skip_bad=True)
    console.print(
        f"{ds.root}: {len(ds.records)} images, {len(ds.samples)} objects, {len(ds.skipped)} skipped"
    )
    for split, count in sorted(ds.split_counts().items(), key=lambda kv: str(kv[0])):
        console.print(f"  split {split or '-'}: {count} images")
    fractions = np.array([s.mask().mean() for s in ds.samples])
    edges = [0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    counts, _ = np.histogram(fractions, bins=edges)
    console.print("object area (fraction of the image):")
    for lo, hi, count in zip(edges[:-1], edges[1:], counts):
        bar = "#" * round(40 * count / max(1, counts.max()))
        console.print(f"  {lo:>5.3f}-{hi:<5.3f} {count:>6} {bar}")
    if png:
        rng = np.random.default_rng(seed)
        chosen = rng.choice(len(ds.samples), size=min(n, len(ds.samples)), replace=False)
        console.print(f"samples drawn to {sample_sheet([ds.samples[i] for i in sorted(chosen)], png)}")
