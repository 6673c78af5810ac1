"""`mechhi dataset build|check|show` through the command line."""

from __future__ import annotations

import json

import numpy as np
import scipy.sparse
from PIL import Image
from typer.testing import CliRunner

from mechhi.commands import app
from mechhi.data import load_dataset
from tests.paper_data import SOURCE, needs_source

runner = CliRunner()


def test_build_synthetic_check_and_show(tmp_path):
    out = tmp_path / "toy"
    built = runner.invoke(
        app, ["dataset", "build", "--source", "synthetic", "--out", str(out), "--n-images", "6"]
    )
    assert built.exit_code == 0, built.output
    assert len(load_dataset(out).records) == 6
    checked = runner.invoke(app, ["dataset", "check", str(out), "--json"])
    assert checked.exit_code == 0 and json.loads(checked.stdout)["problems"] == []
    shown = runner.invoke(
        app, ["dataset", "show", str(out), "--png", str(tmp_path / "sheet.png"), "--n", "4"]
    )
    assert shown.exit_code == 0, shown.output
    assert Image.open(tmp_path / "sheet.png").size[0] > 400


def test_check_fails_on_a_bad_record(tmp_path):
    out = tmp_path / "toy"
    runner.invoke(app, ["dataset", "build", "--source", "synthetic", "--out", str(out), "--n-images", "3"])
    (out / "images" / "000001.png").unlink()
    checked = runner.invoke(app, ["dataset", "check", str(out)])
    assert checked.exit_code == 1
    assert "line 2" in checked.output and "000001" in checked.output


@needs_source
def test_build_paper_reports_kept_and_dropped(tmp_path):
    entries = json.loads((SOURCE / "dataset_masks.json").read_text())[:6]
    images = tmp_path / "val2017"
    images.mkdir()
    for e in entries:  # COCO images are not here: blank ones at the size the masks imply
        files = e["grounding"]["masks_file_name"]
        h, w = scipy.sparse.load_npz(SOURCE / "masks" / files[0][0]).shape if files else (480, 640)
        Image.new("RGB", (w, h)).save(images / e["image_file_name"])
    out = tmp_path / "paper"
    built = runner.invoke(
        app,
        [
            "dataset",
            "build",
            "--source",
            "paper",
            "--paper-dir",
            str(SOURCE),
            "--images",
            str(images),
            "--out",
            str(out),
        ],
    )
    assert built.exit_code == 0, built.output
    ds = load_dataset(out)
    assert len(ds.records) == 6 and "missing image" in built.output
    assert {r.split for r in ds.records} <= {"trace", "train", "val", "test"}
    assert np.all([s.mask().any() for s in ds.samples])
