"""`mechhi.models.tiny`: one builder and one set of test cases per adapter family, found by
the family's name; an unknown name is a one-line error listing the families."""

from __future__ import annotations

import pytest

from mechhi.models import FAMILIES, AdapterError, adapter_for
from mechhi.models.tiny import BUILDERS, CASES, FAMILY_NAMES, build_tiny


def test_every_family_has_a_builder_and_cases_in_the_adapters_order():
    names = tuple(f.family for f in FAMILIES)
    assert names == FAMILY_NAMES and tuple(BUILDERS) == names and tuple(CASES) == names
    assert all(CASES[name] for name in names)


def test_an_unknown_family_is_one_line_naming_the_families():
    with pytest.raises(AdapterError) as raised:
        build_tiny("blip-2", words=["red"])
    message = str(raised.value)
    assert "\n" not in message and "'blip-2'" in message
    assert all(name in message for name in FAMILY_NAMES)


def test_options_reach_the_familys_builder(tmp_path):
    model, processor = build_tiny("qwen2-vl", tmp_path, words=["red", "circle"], layers=1)
    adapter = adapter_for(model.config, processor)
    assert adapter.family == "qwen2-vl" and adapter.n_layers == 1
    assert processor.tokenizer.convert_tokens_to_ids("circle") != processor.tokenizer.unk_token_id
    assert (tmp_path / "config.json").is_file()
