"""`mechhi report`: the page's tables read back with an HTML parser and compared with the
probes that make them (layer_ranking, kruskal_records, the experiment's table4), and
the page checked to be self-contained. The browser test is tests/test_report_browser.py."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from mechhi.report import ReportInput, StoreEntry, build_report
from mechhi.report.sections import gallery_samples
from probes.head_impact import kruskal_records, kruskal_wallis, layer_ranking
from tests.causal_results import ablate_result, edit_result
from tests.figure_stores import fake_experiment, make_store, store_with_images
from tests.helpers import invoke, one_line_error


class Tables(HTMLParser):
    """Every <table id=...>: its rows of cell texts (header row first), and bold cells."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.bold: dict[str, list[str]] = {}
        self._id: str | None = None
        self._cell: list[str] | None = None
        self._in_bold = False

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._id = dict(attrs).get("id") or f"_unnamed{len(self.tables)}"
            self.tables[self._id], self.bold[self._id] = [], []
        elif tag == "tr" and self._id:
            self.tables[self._id].append([])
        elif tag in ("td", "th") and self._id:
            self._cell = []
        elif tag == "b":
            self._in_bold = True

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._id][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._id = None
        elif tag == "b":
            self._in_bold = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
            if self._in_bold:
                self.bold[self._id].append(data)


def read_tables(page: Path) -> Tables:
    parser = Tables()
    parser.feed(page.read_text())
    return parser


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    ds = store_with_images(tmp, n=5, n_layers=4, n_heads=3)
    fake_experiment(tmp / "exp")
    pursuit = {
        "words": ["green"],
        "k": 2,
        "heads": [
            {"rank": 1, "layer": 2, "head": 1, "explained": 0.4, "explained_random": 0.1, "top_word": "green"}
        ],
    }
    report = ReportInput(
        [StoreEntry("toy-model", tmp / "s.zarr", ds)],
        experiment=tmp / "exp",
        pursuit=pursuit,
        gallery_samples=3,
        gallery_heads=2,
    )
    return build_report(report, tmp / "out"), ds


def test_ranking_table_is_layer_ranking(built):
    page, ds = built
    rows = read_tables(page).tables["ranking-0"]
    ranking = layer_ranking(ds)
    assert rows[0][:4] == ["rank", "layer", "depth", "mean HI"]
    assert len(rows) - 1 == ds.sizes["layer"]  # one row per layer
    for row, k in zip(rows[1:], range(ranking.sizes["layer"])):
        assert int(row[0]) == k + 1 and int(row[1]) == int(ranking.layer[k])
        assert float(row[3]) == pytest.approx(float(ranking[k]), rel=1e-3)
        hi = ds.head_impact.sel(layer=int(row[1]))
        assert int(row[5]) == int(hi.argmax()) and float(row[6]) == pytest.approx(float(hi.max()), rel=1e-2)


def test_statistics_are_kruskal_wallis(built):
    page, ds = built
    tables = read_tables(page).tables
    stats_table = tables["kruskal-0"]
    assert stats_table[0][0] == "Kruskal–Wallis"
    for row, test in zip(stats_table[1:], kruskal_records(kruskal_wallis(ds))):
        assert row[0] == test["test"] and int(row[2]) == test["df"] and int(row[5]) == test["n_values"]
        assert float(row[1]) == pytest.approx(test["statistic"], rel=1e-3)
        assert float(row[3]) == pytest.approx(test["p_value"], rel=1e-2)
        assert float(row[4]) == pytest.approx(test["p_holm"], rel=1e-2) and stats_table[0][4] == "Holm p"


def test_statistics_report_attention_sinks(built):
    from probes import sinks

    page, ds = built
    rows = read_tables(page).tables["sinks-0"]
    summary = sinks.summary(sinks.sinks(ds))
    assert [r[0] for r in rows[1:]] == [str(l) for l in range(ds.sizes["layer"])] + ["all"]
    assert rows[-1][2] == f"{summary['mean_sink_share']:.1%}"
    assert rows[-1][1] == f"{float((sinks.sinks(ds).n_sinks > 0).mean()):.1%}"


def test_experiment_tables(built):
    page, _ = built
    parsed = read_tables(page)
    results = json.loads((page.parent.parent / "exp" / "results.json").read_text())
    table4 = parsed.tables["table4"]
    assert table4[0] == ["metric", "original", "top-3", "random-3"]
    for row, want in zip(table4[1:], results["table4"]):
        assert row[0] == want["label"]
        top = want["cells"]["top-3"]
        assert row[2] == f"{top['mean']:.4g} ± {top['se']:.2g}"
        assert "(sd " in row[3] and "3 seeds" in row[3]
    assert len(parsed.bold["table4"]) == 3  # one largest shift per metric
    assert [r[0] for r in parsed.tables["table5"][1:]] == [e["name"] for e in results["setups"]]
    assert [r[-1] for r in parsed.tables["audit"][1:]] == ["ok"] * 4


def test_gallery_is_samples_by_top_heads(built):
    page, ds = built
    rows = read_tables(page).tables["gallery"]
    samples = gallery_samples(ds, 3)
    assert samples == [0, 2, 4]
    hi = ds.head_impact.transpose("layer", "head").values
    best = [np.unravel_index(i, hi.shape) for i in np.argsort(-hi, axis=None, kind="stable")[:2]]
    assert rows[0][1:] == [f"L{l} H{h} (HI {hi[l, h]:.2f})" for l, h in best]
    for row, sample in zip(rows[1:], samples):
        assert row[0].endswith(f"sample {sample}")
        assert row[1:] == [f"IoU {float(ds.iou.sel(sample=sample, layer=l, head=h)):.2f}" for l, h in best]


def test_pursuit_beside_head_impact(built):
    page, ds = built
    pursuit = next(r for r in read_tables(page).tables.values() if r[0][0] == "pursuit rank")
    assert pursuit[1][:3] == ["1", "2", "1"]
    assert float(pursuit[1][-1]) == pytest.approx(float(ds.head_impact.sel(layer=2, head=1)), rel=1e-2)


def test_page_is_self_contained(built):
    page, _ = built
    html = page.read_text()
    sources = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)""", html)
    assert sources and all(s.startswith(("data:", "#")) for s in sources)
    assert not re.search(r"<script|<link|@import|url\(", html)
    assert "/abs/path/to" not in html.split('<section id="ranking"')[1]  # short names past the provenance


def test_missing_images_give_a_note_not_a_failure(tmp_path):
    ds = make_store(tmp_path / "s.zarr", n_layers=3, n_heads=2, grids=[(2, 2), (2, 2)], dataset="/gone#0")
    page = build_report(ReportInput([StoreEntry("m", tmp_path / "s.zarr", ds)]), tmp_path / "out")
    html = page.read_text()
    assert "gallery not drawn" in html and "ranking-0" in html


# ---------------------------------------------------------------- statistics, agreement, causal checks
N_RESAMPLES = 300


@pytest.fixture(scope="module")
def causal_built(tmp_path_factory):
    """A report with the repeated-measures statistics, a probe-agreement file for the store and
    ablation and edit results written by their own writers."""
    tmp = tmp_path_factory.mktemp("causal-report")
    ds = store_with_images(tmp, n=6, n_layers=4, n_heads=3)
    ablated, edited = ablate_result(tmp / "s.zarr", tmp / "ablate"), edit_result(tmp / "s.zarr", tmp / "edit")
    pairs = [
        {
            "level": "head",
            "probe": "head_impact",
            "other": "pursuit",
            "n": 12,
            "spearman": 0.25,
            "spearman_p": 0.4,
            "kendall": 0.2,
            "kendall_p": 0.35,
        }
    ]
    agreement = (tmp / "agreement.json", {"store": str(tmp / "s.zarr"), "words": ["red"], "pairs": pairs})
    other = (tmp / "other.json", {"store": "/elsewhere.zarr", "words": ["red"], "pairs": pairs})
    report = ReportInput(
        [StoreEntry("toy-model", tmp / "s.zarr", ds)],
        ablate=tmp / "ablate",
        edit=tmp / "edit",
        n_resamples=N_RESAMPLES,
        top_k=2,
        gallery_samples=1,
        gallery_heads=1,
    )
    with_file = ReportInput(
        [StoreEntry("toy-model", tmp / "s.zarr", ds)],
        agreement=[agreement, other],
        n_resamples=N_RESAMPLES,
        gallery_samples=1,
        gallery_heads=1,
    )
    return build_report(report, tmp / "out"), build_report(with_file, tmp / "out2"), ds, ablated, edited


def test_friedman_and_bootstrap_tables_are_the_probes(causal_built):
    from probes.statistics import bootstrap_layers, friedman, records

    page, _, ds, _, _ = causal_built
    tables = read_tables(page).tables
    rows = tables["friedman-0"]
    assert rows[0] == ["Friedman", "χ²", "df", "p-value", "Holm p", "Kendall's W", "blocks"]
    tests = records(friedman(ds, unit="image"), "test")
    assert [r[0] for r in rows[1:]] == ["layers"] + [f"heads in layer {l}" for l in range(4)]
    for row, test in zip(rows[1:], tests):
        assert float(row[1]) == pytest.approx(test["statistic"], rel=1e-3) and int(row[2]) == test["df"]
        assert float(row[3]) == pytest.approx(test["p_value"], rel=1e-2)
        assert float(row[4]) == pytest.approx(test["p_holm"], rel=1e-2)
        assert (
            float(row[5]) == pytest.approx(test["kendall_w"], abs=1e-3)
            and int(row[6]) == test["n_blocks"] == 6
        )
    boot = records(bootstrap_layers(ds, k=2, n_resamples=N_RESAMPLES), "layer")
    by_layer = {int(r[0]): r for r in tables["bootstrap-0"][1:]}
    assert tables["bootstrap-0"][0][-1] == "in top-2" and len(by_layer) == 4
    for want in boot:
        row = by_layer[want["layer"]]
        assert float(row[1]) == pytest.approx(want["mean_hi"], rel=1e-3)
        assert float(row[2]) == pytest.approx(want["ci_low"], rel=1e-2) and float(row[3]) == pytest.approx(
            want["ci_high"], rel=1e-2
        )
        assert row[4] == f"{want['top_k_share']:.0%}"
    assert "kruskal-0" in tables  # the paper's test stays beside them


def test_agreement_from_the_store_is_spearman_of_hi_and_lift(causal_built):
    from scipy import stats

    from probes.attention_mass import attention_mass, head_means

    page, _, ds, _, _ = causal_built
    rows = read_tables(page).tables["agreement-0"]
    assert rows[0][:4] == ["level", "probe", "other", "Spearman ρ"]
    hi = ds.head_impact.transpose("layer", "head").values
    lift = head_means(attention_mass(ds))["object_lift"].transpose("layer", "head").values
    head_row = next(r for r in rows[1:] if r[0] == "head")
    assert head_row[1:3] == ["head-impact", "attention-mass"] and int(head_row[-1]) == hi.size
    assert float(head_row[3]) == pytest.approx(stats.spearmanr(hi.ravel(), lift.ravel()).statistic, abs=1e-3)
    assert float(head_row[5]) == pytest.approx(stats.kendalltau(hi.ravel(), lift.ravel()).statistic, abs=1e-3)
    layer_row = next(r for r in rows[1:] if r[0] == "layer")
    assert float(layer_row[3]) == pytest.approx(stats.spearmanr(hi.mean(1), lift.mean(1)).statistic, abs=1e-3)


def test_agreement_file_replaces_its_stores_table(causal_built):
    _, page, _, _, _ = causal_built
    tables = read_tables(page).tables
    assert tables["agreement-0"][1][:4] == [
        "head",
        "head-impact",
        "pursuit",
        "0.250",
    ]  # one format for the column
    assert (
        "agreement-file-1" in tables and "agreement-file-0" not in tables
    )  # the file of another store, shown on its own
    assert "from other.json (store /elsewhere.zarr)" in page.read_text()


def test_ablation_section_is_the_summary(causal_built):
    page, _, _, ablated, _ = causal_built
    tables = read_tables(page).tables
    rows = tables["ablation"]
    assert len(rows) - 1 == len(ablated["summary"]) == 4 * 3  # top, bottom, matched, depth x 3 metrics
    top_vqa = next(r for r in rows[1:] if r[:2] == ["top-2", "vqa_accuracy"])
    want = next(r for r in ablated["summary"] if r["group"] == "top" and r["metric"] == "vqa_accuracy")
    assert top_vqa[2] == f"{want['change']:+.3g} ± {want['se']:.2g}" and top_vqa[3:] == ["-", "-", "-"]
    matched = next(r for r in rows[1:] if r[:2] == ["matched", "vqa_accuracy"])
    spread = next(r for r in ablated["summary"] if r["group"] == "matched" and r["metric"] == "vqa_accuracy")[
        "seeds"
    ]
    assert (
        float(matched[3]) == pytest.approx(spread["sd"], rel=1e-2)
        and matched[5] == f"{spread['as_extreme']:.0%}"
    )
    top = next(s for s in ablated["setups"] if s["kind"] == "top")
    assert tables["ablation-heads"][1][:2] == ["top-2", ", ".join(f"L{l} H{h}" for l, h in top["heads"])]


def test_edit_section_is_the_summary_ranking_and_captions(causal_built):
    page, _, _, _, edited = causal_built
    tables = read_tables(page).tables
    concept = next(r for r in tables["edit"][1:] if r[:2] == ["top-2", "concept"])
    want = next(r for r in edited["summary"] if r["group"] == "top" and r["measure"] == "concept")
    assert concept[3] == f"{want['ratio']:.3g} ± {want['ratio_se']:.2g}"
    assert [[int(r[0]), int(r[1])] for r in tables["edit-ranking"][1:]] == [
        [r["layer"], r["head"]] for r in edited["ranking"]
    ]
    unedited, top = edited["setups"][0], edited["setups"][1]
    assert tables["edit-captions"][1] == [
        unedited["captions"][0]["image_id"],
        unedited["captions"][0]["generated"],
        top["captions"][0]["generated"],
    ]


def test_report_cli_routes_a_causal_result_given_as_experiment(causal_built, tmp_path):
    page, _, _, _, _ = causal_built
    root = page.parent.parent
    out = tmp_path / "rep"
    result = invoke(
        [
            "report",
            "--store",
            root / "s.zarr",
            "--experiment",
            root / "ablate",
            "--edit",
            root / "edit",
            "--n-resamples",
            "100",
            "--samples",
            "1",
            "--out",
            out,
        ]
    )
    html = (out / "index.html").read_text()
    assert result.stdout == f"{out / 'index.html'}\n"
    assert 'id="ablation"' in html and 'id="edit"' in html and 'id="table4"' not in html
    twice = invoke(
        [
            "report",
            "--store",
            root / "s.zarr",
            "--experiment",
            root / "ablate",
            "--ablate",
            root / "ablate",
            "--out",
            out,
        ],
        exit_code=1,
    )
    assert "is an ablation result, and --ablate gives one too" in one_line_error(twice)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    wrong = invoke(["report", "--store", root / "s.zarr", "--agreement", bad, "--out", out], exit_code=1)
    assert f"--agreement {bad}: not the output of `mechhi rank --compare-probes --json`" in one_line_error(
        wrong
    )


def test_a_column_of_numbers_has_one_format():
    """`0`, `0.0909`, `1` in one column were three precisions; now one (the smallest nonzero
    keeps its digits), and p-values share one format per column, bold below 0.001."""
    from mechhi.report.html import number, p_value, table

    html = table(
        ["a", "b", "p"],
        [
            [number(0), number(0.354), p_value(0.2)],
            [number(0.0909), number(0.2244, 4), p_value(2e-5)],
            [number(1), number(None), p_value(0.5)],
        ],
    )
    cells = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", str(html))[1:]]
    assert [c[0] for c in cells] == ["0.0000", "0.0909", "1.0000"]
    assert [c[1] for c in cells] == ["0.3540", "0.2244", "n/a"]
    assert [c[2] for c in cells] == ["2.00e-01", "<b>2.00e-05</b>", "5.00e-01"]
    assert str(number(0.0909)) == "0.0909" and f"{number(2 / 3, 2)}" == "0.67"  # outside a table: as before


def test_figures_fill_a_wide_column(built):
    """The page's column takes a wide window and a figure shows at 150 px per inch (the layers
    figure, 6.4 in, 960 px wide), not 110 (704 px) in a 1200 px column."""
    page, _ = built
    html = page.read_text()
    widths = {alt: int(w) for alt, w in re.findall(r'<img class="figure" alt="([^"]+)" width="(\d+)"', html)}
    assert widths["Head Impact per layer and per head"] == 960
    main = re.search(r"main \{[^}]*max-width: (\d+)px", html)
    assert main and int(main.group(1)) >= 1400
