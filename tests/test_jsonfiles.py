"""The JSON mechhi writes parses with any reader; cache keys follow the settings."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mechhi.jsonfiles import dumps, json_key, json_ready, write_json


def test_non_finite_numbers_become_null_and_numpy_values_plain():
    value = {"a": (1.0, math.nan, math.inf), "b": np.float32(2.5), "c": np.arange(3), "d": [np.nan]}
    assert json_ready(value) == {"a": [1.0, None, None], "b": 2.5, "c": [0, 1, 2], "d": [None]}
    text = dumps(value)
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["a"] == [1.0, None, None]


def test_dumps_refuses_what_is_not_json():
    with pytest.raises(TypeError, match="set is not JSON-serialisable"):
        dumps({"x": {1, 2}})


def test_write_json_is_atomic_and_returns_what_it_wrote(tmp_path):
    path = tmp_path / "out" / "r.json"
    written = write_json(path, {"x": float("nan")})
    assert written == {"x": None} and json.loads(path.read_text()) == {"x": None}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no partial file left beside it


def test_cache_keys_ignore_order_and_follow_values():
    assert json_key({"a": 1, "b": [1, 2]}) == json_key({"b": [1, 2], "a": 1})
    assert json_key({"a": 1}) != json_key({"a": 2})
    assert len(json_key({})) == 16
