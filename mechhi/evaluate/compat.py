"""Does a saved adapter belong to the model it is about to be loaded onto?

Two questions, asked before peft loads anything. Was the adapter trained on this base
model (`same_base`)? An adapter of the same shape loads silently onto another
checkpoint and gives numbers for a model nobody trained, so `mechhi evaluate` refuses
that unless forced. Does it fit (`check_fits`)? Every LoRA matrix in
``adapter_model.safetensors`` must find its module in the model with the matching in /
out features; otherwise the message says which module does not match, instead of
peft's page-long state_dict error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


class AdapterMismatch(ValueError):
    """A saved adapter that does not fit, or was not trained on, the model at hand."""


def same_base(trained_on: str, model: str) -> bool:
    """The same model id, or the same directory however it is written."""
    if str(trained_on) == str(model):
        return True
    a, b = Path(trained_on), Path(model)
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def adapter_shapes(adapter_dir: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} that the adapter's LoRA matrices expect."""
    from safetensors import safe_open

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterMismatch(
            f"{adapter_dir} has no {ADAPTER_WEIGHTS}: an unfinished or foreign adapter directory"
        )
    found: dict[str, dict[str, list[int]]] = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():  # noqa: SIM118  (a safetensors file handle, not a dict)
            match = _KEY.match(key)
            if match:
                found.setdefault(match["module"], {})[match["ab"]] = f.get_slice(key).get_shape()
    return {name: (m["A"][1], m["B"][0]) for name, m in found.items() if "A" in m and "B" in m}


def check_fits(model: torch.nn.Module, adapter_dir: str | os.PathLike, model_name: str = "the model") -> None:
    """Raise `AdapterMismatch` naming the first LoRA module that the model lacks or sizes differently."""
    modules = dict(model.named_modules())
    problems = []
    for name, (fan_in, fan_out) in sorted(adapter_shapes(adapter_dir).items()):
        module = modules.get(name)
        if module is None:
            problems.append(f"{name} is not in {model_name}")
            continue
        shape = (getattr(module, "in_features", None), getattr(module, "out_features", None))
        if shape != (fan_in, fan_out):
            problems.append(
                f"{name} maps {shape[0]} -> {shape[1]} features in {model_name}, "
                f"{fan_in} -> {fan_out} in the adapter"
            )
    if problems:
        more = f" (and {len(problems) - 1} more LoRA modules)" if len(problems) > 1 else ""
        raise AdapterMismatch(f"adapter {adapter_dir} does not fit {model_name}: {problems[0]}{more}")
