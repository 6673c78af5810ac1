"""`rank --compare-probes` with the causal results beside a store: patching and attribution
zarrs as `mechhi patch` writes them, a one-layer-window knockout report, read back as
scores whose ranks are known by construction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

from mechhi.commands import app
from mechhi.flow.causal_scores import causal_scores, knockout_layer_scores
from mechhi.store import open_store


def _write_patch(store, method: str, change: str, effect: np.ndarray) -> None:
    ds = open_store(store)
    folder = store.with_suffix(".patch")
    folder.mkdir(exist_ok=True)
    result = xr.Dataset(
        {"effect": (("layer", "head"), effect), "se": (("layer", "head"), np.zeros_like(effect))},
        coords={"layer": np.arange(effect.shape[0]), "head": np.arange(effect.shape[1])},
        attrs={"model": ds.attrs["model"], "method": method, "change": change},
    )
    result.to_zarr(folder / f"patch-{method}-{change}-heads-all.zarr", mode="w", consolidated=False)


def _knockout_report(n_layers: int, drops: list[float], pair: str = "image->description") -> dict:
    rows = [
        {
            "pair": pair,
            "window": [i, i],
            "layers": [i],
            "change": {"answer_logprob": {"mean": -d, "se": 0.1, "n": 8}},
        }
        for i, d in enumerate(drops)
    ]
    return {"model": "m", "n_layers": n_layers, "pairs": [pair], "rows": rows}


def test_knockout_scores_are_the_drop_per_layer_and_need_one_layer_windows():
    scores = knockout_layer_scores(_knockout_report(3, [0.5, 2.0, -0.1]), "image->description")
    np.testing.assert_allclose(scores.values, [0.5, 2.0, -0.1])
    with pytest.raises(ValueError, match="no pair 'question->last'; it has image->description"):
        knockout_layer_scores(_knockout_report(3, [0, 0, 0]), "question->last")
    wide = _knockout_report(2, [1.0, 1.0])
    wide["rows"][0]["layers"] = [0, 1]
    with pytest.raises(ValueError, match="--window 1"):
        knockout_layer_scores(wide, "image->description")


def test_compare_probes_includes_the_causal_results_beside_the_store(toy_store, tmp_path):
    import shutil

    store = tmp_path / "toy.zarr"
    shutil.copytree(toy_store, store)
    ds = open_store(store)
    n_layers, n_heads = ds.sizes["layer"], ds.sizes["head"]
    exact = np.arange(n_layers * n_heads, dtype=float).reshape(n_layers, n_heads)
    _write_patch(store, "exact", "colour", exact)
    _write_patch(store, "attribution", "colour", -exact)  # the reverse order: rho -1 by construction
    knockout = tmp_path / "knockout.json"
    knockout.write_text(json.dumps(_knockout_report(n_layers, list(np.arange(n_layers, dtype=float)))))

    scores, missing = causal_scores(ds, store, knockout=knockout)
    assert set(scores) == {"patching", "attribution", "knockout"} and missing == []
    assert scores["knockout"].dims == ("layer",)

    args = [
        "rank",
        "--store",
        str(store),
        "--compare-probes",
        "--device",
        "cpu",
        "--json",
        "--knockout",
        str(knockout),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["probes"][-3:] == ["patching", "attribution", "knockout"]
    pairs = {(p["level"], p["probe"], p["other"]): p for p in payload["pairs"]}
    assert pairs[("head", "patching", "attribution")]["spearman"] == pytest.approx(-1.0)
    assert pairs[("head", "patching", "attribution")]["n"] == n_layers * n_heads
    assert pairs[("layer", "patching", "knockout")]["spearman"] == pytest.approx(
        1.0
    )  # both rise with the layer
    assert pairs[("head", "patching", "knockout")]["n"] == 0
    assert payload["causal"]["missing"] == []


def test_compare_probes_says_what_is_missing_and_how_to_make_it(toy_store, tmp_path):
    import shutil

    store = tmp_path / "toy.zarr"
    shutil.copytree(toy_store, store)
    ds = open_store(store)
    scores, missing = causal_scores(ds, store)
    assert scores == {} and len(missing) == 3
    assert any("mechhi patch --store" in m and "--method both" in m for m in missing)
    assert any("mechhi knockout --store" in m and "--window 1" in m for m in missing)
    shape = (ds.sizes["layer"], ds.sizes["head"])
    _write_patch(store, "exact", "colour", np.zeros(shape))
    _write_patch(store, "exact", "shape", np.zeros(shape))
    scores, missing = causal_scores(ds, store)
    assert "patching" not in scores  # two changes, none chosen
    assert "patching" in causal_scores(ds, store, change="shape")[0]
    _write_patch(store, "attribution", "colour", np.zeros((2, 2)))
    with pytest.raises(ValueError, match="patched on another model"):
        causal_scores(ds, store, change="colour")
