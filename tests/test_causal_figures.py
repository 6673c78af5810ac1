"""Ablation and edit results as result tables and figures: the cells against numbers
computed by hand from the known per-sample values the writers were fed
(tests/causal_results.py), one point per setup in every panel, the kind of a JSON told
from its keys, and `mechhi plot results` on each kind through the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mechhi import figures
from tests.causal_results import (
    COLOURS,
    SEEDS,
    ablate_result,
    ablate_values,
    edit_captions,
    edit_result,
    edit_samples,
)
from tests.figure_stores import fake_experiment, make_store
from tests.helpers import invoke, one_line_error


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("causal")
    make_store(tmp / "s.zarr", n_layers=4, n_heads=3, grids=[(3, 3)] * 4)
    return tmp, ablate_result(tmp / "s.zarr", tmp / "ablate"), edit_result(tmp / "s.zarr", tmp / "edit")


def _se(d: np.ndarray) -> float:
    return float(d.std(ddof=1) / math.sqrt(len(d)))


def by_hand_change(heads, base_heads, metric: str) -> tuple[float, float]:
    """(change, paired SE) of a metric from the per-sample values, without mechhi.intervene.effects."""
    key = {
        "perplexity": "nll",
        "vqa_correct": "vqa_correct",
        "vqa_accuracy": "vqa_correct",
        "ans_prob": "ans_prob",
    }[metric]
    x, y = np.array(ablate_values(heads)[key]), np.array(ablate_values(base_heads)[key])
    if metric == "perplexity":  # exp of the mean NLL; delta method: exp(m) * values
        return math.exp(x.mean()) - math.exp(y.mean()), _se(math.exp(x.mean()) * x - math.exp(y.mean()) * y)
    return float(x.mean() - y.mean()), _se(x - y)


def test_ablation_cells_are_the_changes_by_hand(results):
    _, ablated, _ = results
    table = figures.load_results(results[0] / "ablate")
    assert table.setups == (
        "unablated",
        "top-2",
        "bottom-2",
        "matched random (3 seeds)",
        "depth random (3 seeds)",
    )
    assert table.baseline == "unablated" and [m.name for m in table.metrics] == [
        "perplexity",
        "vqa_accuracy",
        "ans_prob",
    ]
    heads = {s["name"]: s["heads"] for s in ablated["setups"]}
    for metric in ("perplexity", "vqa_accuracy", "ans_prob"):
        cells = table.cells[metric]
        assert cells["unablated"].mean == 0 and cells["unablated"].se == 0
        for setup in ("top-2", "bottom-2"):
            change, se = by_hand_change(heads[setup], [], metric)
            assert cells[setup].mean == pytest.approx(change) and cells[setup].se == pytest.approx(se)
            assert cells[setup].spread_sd is None
        for group in ("matched", "depth"):
            changes = [by_hand_change(heads[f"{group} (seed {s})"], [], metric) for s in SEEDS]
            cell = cells[f"{group} random (3 seeds)"]
            assert cell.mean == pytest.approx(np.mean([c for c, _ in changes]))
            assert cell.se == pytest.approx(np.mean([s for _, s in changes]))
            assert (
                cell.spread_sd == pytest.approx(np.std([c for c, _ in changes], ddof=1)) and cell.n_seeds == 3
            )


def count(caption: str, words) -> int:
    return sum(w in words for w in caption.split())


def test_edit_cells_are_word_counts_by_hand(results):
    _, _, edited = results
    table = figures.load_results(results[0] / "edit" / "edit.json")
    assert table.setups == ("unedited", "top-2", "matched random (3 seeds)") and table.baseline == "unedited"
    samples = edit_samples()
    truth = [s.record.objects[0].description for s in samples]
    base = edit_captions((), samples)
    heads = {s["name"]: s["heads"] for s in edited["setups"]}

    def ratio(name):  # words per caption, edited over unedited
        return sum(count(c, COLOURS) for c in edit_captions(heads[name], samples)) / sum(
            count(c, COLOURS) for c in base
        )

    def right_share(captions):
        said = sum(count(c, COLOURS) for c in captions)
        return sum(count(c, [w for w in COLOURS if w in t]) for c, t in zip(captions, truth)) / said

    assert table.cells["concept"]["unedited"].mean == 1
    assert table.cells["concept"]["top-2"].mean == pytest.approx(ratio("top-2"))
    ratios = [ratio(f"matched (seed {s})") for s in SEEDS]
    matched = table.cells["concept"]["matched random (3 seeds)"]
    assert matched.mean == pytest.approx(np.mean(ratios)) and matched.spread_sd == pytest.approx(
        np.std(ratios, ddof=1)
    )
    top_captions = edit_captions(heads["top-2"], samples)
    assert table.cells["concept_precision"]["top-2"].mean == pytest.approx(
        right_share(top_captions) - right_share(base)
    )
    assert table.cells["control"]["top-2"].mean == pytest.approx(1.0)  # the shapes are never touched


def test_figure_has_one_point_per_setup(results):
    table = figures.load_results(results[0] / "ablate")
    fig = figures.results_figure(table)
    assert len(fig.axes) == 3
    for ax, metric in zip(fig.axes, table.metrics):
        assert [t.get_text() for t in ax.get_xticklabels()] == list(table.setups)
        points = [c for c in ax.containers if c.lines[0].get_marker() == "o"]
        assert [p.lines[0].get_ydata()[0] for p in points] == pytest.approx(
            [table.cells[metric.name][s].mean for s in table.setups]
        )
        assert len(ax.containers) - len(points) == 2  # the seed spreads of the two random groups


def test_result_kinds_are_told_apart(results, tmp_path):
    tmp, ablated, edited = results
    fake_experiment(tmp_path / "exp")
    assert figures.read_result(tmp_path / "exp")[0] == "experiment"
    assert figures.result_kind(ablated) == "ablation" and figures.result_kind(edited) == "edit"
    (tmp_path / "other.json").write_text(json.dumps({"setups": [{"kind": "top"}]}))
    with pytest.raises(figures.PlotError, match="other.json is none of the known results"):
        figures.load_results(tmp_path / "other.json")
    both = tmp_path / "both"
    both.mkdir()
    for name in ("ablate.json", "edit.json"):
        (both / name).write_text("{}")
    with pytest.raises(figures.PlotError, match="holds ablate.json and edit.json: give the file itself"):
        figures.load_results(both)
    with pytest.raises(figures.PlotError, match="is mechhi ablate's result, not mechhi edit's"):
        figures.load_results(tmp / "ablate", kind="edit")


def test_plot_results_on_each_kind(results, tmp_path):
    tmp, _, _ = results
    for args, name in (
        (["--results", tmp / "ablate" / "ablate.json"], "a.svg"),
        (["--experiment", tmp / "edit"], "e.png"),
    ):
        out = tmp_path / name
        result = invoke(["plot", "results", *args, "--out", out])
        assert result.stdout == f"{out}\n" and out.stat().st_size > 5000


def test_plot_results_errors_are_one_line(results, tmp_path):
    tmp, _, _ = results
    bogus = tmp_path / "bogus.json"
    bogus.write_text(json.dumps({"hello": 1}))
    line = one_line_error(
        invoke(["plot", "results", "--results", bogus, "--out", tmp_path / "x.png"], exit_code=1)
    )
    assert f"{bogus} is none of the known results" in line
    both = invoke(
        ["plot", "results", "--results", bogus, "--experiment", tmp / "edit", "--out", tmp_path / "x.png"],
        exit_code=1,
    )
    assert "give --experiment or --results, not both" in one_line_error(both)
