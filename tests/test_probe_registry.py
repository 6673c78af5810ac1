"""The probe registry: a probe is one registration, and every reader takes it from there."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from mechhi.scoring.probe_scores import probe_scores
from mechhi.store import open_store
from probes import registry
from probes.attention_mass import attention_mass, head_means
from probes.registry import Probe, get_probe, probe_names, register_probe
from tests.helpers import invoke, invoke_json, one_line_error


@pytest.fixture
def fresh_registry(monkeypatch):
    """Registrations made in a test are gone after it."""
    monkeypatch.setattr(registry, "_PROBES", dict(registry._PROBES))


def _layer_index(inputs) -> xr.DataArray:
    """A probe with a known answer: every head of layer l scores l."""
    ds = inputs.ds
    layers = ds["layer"].values
    values = np.repeat(layers[:, None], ds.sizes["head"], axis=1).astype(float)
    return xr.DataArray(values, dims=("layer", "head"), coords={"layer": layers, "head": ds["head"].values})


def test_built_in_probes_in_order_and_by_need():
    assert probe_names() == ("head-impact", "attention-mass", "spatial-entropy", "pursuit", "logit-lens")
    assert probe_names(model=False) == ("head-impact", "attention-mass", "spatial-entropy")
    assert probe_names(model=True) == ("pursuit", "logit-lens")
    assert get_probe("pursuit").needs == ("model", "words") and get_probe("pursuit").variable == "pursuit"


def test_unknown_names_duplicates_and_needs_are_refused(fresh_registry):
    with pytest.raises(ValueError, match="unknown probe 'gaze'; available: head-impact, attention-mass"):
        get_probe("gaze")
    with pytest.raises(ValueError, match="unknown probe 'pursuit'"):
        get_probe("pursuit", model=False)
    with pytest.raises(ValueError, match="already registered"):
        register_probe(Probe("head-impact", ("store",), "again", _layer_index))
    with pytest.raises(ValueError, match="unknown needs"):
        Probe("x", ("gpu",), "", _layer_index)


def test_a_registered_probe_reaches_probe_scores_and_rank(fresh_registry, multiview_store):
    path, _, _ = multiview_store
    register_probe(Probe("layer-index", ("store",), "the layer's index", _layer_index))
    ds = open_store(path)
    scores = probe_scores(ds, ["layer-index", "attention-mass"], progress=False)
    np.testing.assert_array_equal(scores["layer_index"].values[:, 0], ds["layer"].values)
    expected = head_means(attention_mass(ds))["object_lift"].transpose("layer", "head").values
    np.testing.assert_allclose(
        scores["attention_mass"].values, expected
    )  # the same as the kernel run by hand
    payload = invoke_json(["rank", "--store", path, "--probe", "layer-index"])
    assert [row["layer"] for row in payload["layers"]] == sorted(ds["layer"].values.tolist(), reverse=True)
    assert [row["mean_layer_index"] for row in payload["layers"]] == sorted(
        ds["layer"].values.tolist(), reverse=True
    )


def test_rank_refuses_a_probe_that_needs_the_model(multiview_store):
    path, _, _ = multiview_store
    error = one_line_error(invoke(["rank", "--store", path, "--probe", "pursuit"], exit_code=1))
    assert "unknown probe 'pursuit'; available: head-impact, attention-mass, spatial-entropy" in error
