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
from tests.figure_stores import fake_experiment, make_store, store_with_images


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
    pursuit = {"words": ["green"], "k": 2, "heads": [{"rank": 1, "layer": 2, "head": 1, "explained": 0.4,
                                                       "explained_random": 0.1, "top_word": "green"}]}  # fmt: skip
    report = ReportInput([StoreEntry("toy-model", tmp / "s.zarr", ds)], experiment=tmp / "exp", pursuit=pursuit,
                         gallery_samples=3, gallery_heads=2)  # fmt: skip
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
    stats_table = next(rows for rows in tables.values() if rows[0][0] == "Kruskal–Wallis")
    for row, test in zip(stats_table[1:], kruskal_records(kruskal_wallis(ds))):
        assert row[0] == test["test"] and int(row[2]) == test["df"] and int(row[4]) == test["n_values"]
        assert float(row[1]) == pytest.approx(test["statistic"], rel=1e-3)
        assert float(row[3]) == pytest.approx(test["p_value"], rel=1e-2)


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
    assert "/abs/path/to" not in html.split("<section id=\"ranking\"")[1]  # short names past the provenance


def test_missing_images_give_a_note_not_a_failure(tmp_path):
    ds = make_store(tmp_path / "s.zarr", n_layers=3, n_heads=2, grids=[(2, 2), (2, 2)], dataset="/gone#0")
    page = build_report(ReportInput([StoreEntry("m", tmp_path / "s.zarr", ds)]), tmp_path / "out")
    html = page.read_text()
    assert "gallery not drawn" in html and "ranking-0" in html
