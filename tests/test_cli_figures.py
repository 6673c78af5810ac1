"""`mechhi plot` and `mechhi report` through the command line: stdout carries only the
written path, errors are one line naming the bad option and what the store has."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from mechhi.commands import app
from tests.figure_stores import fake_experiment, store_with_images

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    store_with_images(tmp, n=3, n_layers=4, n_heads=2)
    fake_experiment(tmp / "exp")
    return tmp


@pytest.mark.parametrize(
    "args, name",
    [
        (["heatmap"], "hi.png"),
        (["layers"], "layers.svg"),
        (["overlay", "--top", "3", "--sample", "1"], "top.pdf"),
        (["overlay", "--layer", "2"], "o.png"),
    ],
)
def test_plot_prints_only_the_path(store, tmp_path, args, name):
    out = tmp_path / name
    result = runner.invoke(
        app, ["plot", *args, "--store", str(store / "s.zarr"), "--out", str(out), "--dpi", "90"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out}\n"
    assert out.stat().st_size > 1000


def test_plot_compare_and_results(store, tmp_path):
    s = str(store / "s.zarr")
    compared = runner.invoke(
        app, ["plot", "compare", "--store", s, "--store", s, "--out", str(tmp_path / "c.png")]
    )
    assert compared.exit_code == 0, compared.output
    results = runner.invoke(
        app, ["plot", "results", "--experiment", str(store / "exp"), "--out", str(tmp_path / "r.png")]
    )
    assert results.exit_code == 0, results.output
    with Image.open(tmp_path / "r.png") as im:
        assert im.width > 600


@pytest.mark.parametrize(
    "args, message",
    [
        (["overlay", "--layer", "99"], "layer 99 is not in the store (its layers: 0..3)"),
        (["overlay", "--sample", "7"], "sample 7 is not in the store (its samples: 0..2)"),
        (["overlay", "--layer", "1", "--head", "5"], "head 5 is not in the store (its heads: 0..1)"),
        (["heatmap", "--top", "2"], "--top applies to `plot overlay` only"),
        (["compare"], "plot compare takes two or more --store"),
        (["pie"], "unknown plot 'pie'"),
    ],
)
def test_plot_errors_are_one_line(store, tmp_path, args, message):
    result = runner.invoke(
        app, ["plot", *args, "--store", str(store / "s.zarr"), "--out", str(tmp_path / "x.png")]
    )
    assert result.exit_code == 1
    assert result.stdout == ""
    assert message in " ".join(result.stderr.split()) and "Traceback" not in result.stderr


def test_labels_name_the_stores_in_compare_heatmap_and_report(store, tmp_path, monkeypatch):
    """--label (one per --store) reaches the compare legend, the heatmap's panel titles and the
    report's columns; without it the stores get short labels, never a path with "#2"."""
    from mechhi import figures

    drawn = {}
    for name in ("compare_figure", "heatmap_figure"):
        real = getattr(figures, name)
        monkeypatch.setattr(
            figures, name, lambda ds, _real=real, _name=name, **kw: drawn.setdefault(_name, _real(ds, **kw))
        )
    s = str(store / "s.zarr")
    two = ["--store", s, "--store", s, "--label", "smollm2", "--label", "gemma3"]
    for kind in ("compare", "heatmap"):
        result = runner.invoke(app, ["plot", kind, *two, "--out", str(tmp_path / f"{kind}.png")])
        assert result.exit_code == 0, result.output
    legend = [t.get_text() for t in drawn["compare_figure"].axes[0].get_legend().get_texts()]
    assert legend == ["smollm2 (4 layers)", "gemma3 (4 layers)"]
    assert [ax.get_title() for ax in drawn["heatmap_figure"].axes[:2]] == ["smollm2", "gemma3"]
    page = runner.invoke(
        app, ["report", *two, "--out", str(tmp_path / "rep"), "--samples", "1", "--heads", "1"]
    )
    assert page.exit_code == 0, page.output
    html = (tmp_path / "rep" / "index.html").read_text()
    assert (
        "<th>smollm2</th>" in html and "<th>gemma3</th>" in html and "mechhi report: smollm2, gemma3" in html
    )


@pytest.mark.parametrize(
    "labels, message",
    [(["a"], "--label: 1 given for 2 stores"), (["a", "a"], "--label: 'a' given to more than one store")],
)
def test_bad_labels_are_one_line(store, tmp_path, labels, message):
    s = str(store / "s.zarr")
    args = ["--store", s, "--store", s, *[w for label in labels for w in ("--label", label)]]
    for command in (
        ["plot", "compare", *args, "--out", str(tmp_path / "c.png")],
        ["report", *args, "--out", str(tmp_path / "r")],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 1 and result.stdout == ""
        assert message in result.stderr and "Traceback" not in result.stderr


def test_bad_extension_refused_before_work(store, tmp_path):
    result = runner.invoke(
        app, ["plot", "heatmap", "--store", str(store / "s.zarr"), "--out", str(tmp_path / "x.gif")]
    )
    assert result.exit_code == 1 and ".png, .svg, .pdf" in result.stderr


def test_report_command(store, tmp_path):
    pursuit = tmp_path / "pursuit.json"
    pursuit.write_text(json.dumps({"words": ["green"], "k": 1, "heads": []}))
    result = runner.invoke(
        app,
        [
            "report",
            "--store",
            str(store / "s.zarr"),
            "--experiment",
            str(store / "exp"),
            "--pursuit",
            str(pursuit),
            "--out",
            str(tmp_path / "rep"),
            "--samples",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{tmp_path / 'rep' / 'index.html'}\n"
    html = (tmp_path / "rep" / "index.html").read_text()
    assert 'id="ranking-0"' in html and 'id="table4"' in html and "Head Pursuit of green" in html
    missing = runner.invoke(app, ["report", "--out", str(tmp_path / "r2")])
    assert missing.exit_code == 1 and "report needs --store" in missing.stderr
