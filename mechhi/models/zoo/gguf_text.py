"""A language model from a GGUF file, through transformers' own GGUF loader, and the checks
that the dequantised weights and the model's behaviour are what the file holds.

transformers (``from_pretrained(folder, gguf_file=name)``, needs the ``gguf`` package)
dequantises every tensor to float32 and undoes llama.cpp's storage conventions (Llama's
q/k rows in its rotary layout, Gemma's norms stored as 1 + w). `check_dequantisation`
compares a few of the resulting weights with the ``gguf`` package's own reader and
dequantiser, undoing the conventions itself (`STORAGE_RULES`), so a loader bug in either
direction shows up as a difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# GGUF tensor -> transformers parameter, the same names for Llama and Gemma 3; tensors a
# file lacks are skipped (Llama has no q_norm).
CHECKED_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
    "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
    "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
    "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
    "blk.0.attn_q_norm.weight": "model.layers.0.self_attn.q_norm.weight",
    "output_norm.weight": "model.norm.weight",
}


@dataclass(frozen=True)
class StorageRule:
    """How an architecture's GGUF tensors differ from transformers' (llama.cpp's
    convert_hf_to_gguf, restated here so the check does not reuse transformers' code)."""

    permute_q: bool  # q rows in llama.cpp's interleaved rotary order
    norm_offset: float  # RMSNorm weights stored as offset + w (Gemma's norms scale by 1 + w)


STORAGE_RULES = {
    "llama": StorageRule(permute_q=True, norm_offset=0.0),
    "gemma3": StorageRule(permute_q=False, norm_offset=1.0),
}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading a GGUF file needs `gguf`: pip install 'mechhi[pretrained]'") from None
    return gguf


def load_gguf(path: Path) -> tuple[Any, Any]:
    """(causal LM in float32, eval; its tokenizer) from one GGUF file."""
    from transformers import AutoTokenizer

    return load_gguf_model(path), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def load_gguf_model(path: Path) -> Any:
    """The causal LM of a GGUF file, dequantised to float32 by transformers, as a plain model."""
    _gguf()
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # The weights are plain float32 now, but the loaded model still counts as "quantised
    # with gguf" (not serialisable): move them into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = type(loaded)(config)  # on CPU: its rotary buffers are computed, not loaded
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    return model.eval()


def unpermute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order back to Hugging Face's: within each head, llama.cpp
    interleaves the two rotary halves (rows 0, d/2, 1, d/2+1, ...)."""
    rows, cols = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def check_dequantisation(model: Any, path: Path, tensors: dict[str, str] | None = None) -> dict[str, float]:
    """Max |transformers' weight - gguf's dequantisation| for each checked tensor the file has,
    after undoing the architecture's storage rule (`STORAGE_RULES`)."""
    gguf = _gguf()
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    architecture = architecture_of(reader)
    if architecture not in STORAGE_RULES:
        raise ValueError(
            f"GGUF check: {path.name} is a {architecture!r} model; the check knows {', '.join(STORAGE_RULES)}"
        )
    rule = STORAGE_RULES[architecture]
    by_name = {t.name: t for t in reader.tensors}
    params = dict(model.named_parameters())
    heads = int(model.config.num_attention_heads)
    out = {}
    for name, param in (tensors or CHECKED_TENSORS).items():
        if name not in by_name or param not in params:
            continue
        tensor = by_name[name]
        reference = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        reference = reference.reshape(tuple(int(d) for d in reversed(tensor.shape)))  # ggml dims are reversed
        if ".attn_q." in name and rule.permute_q:
            reference = unpermute_rotary(reference, heads)
        if name.endswith("norm.weight"):
            reference = reference - rule.norm_offset
        ours = params[param].detach().float().numpy()
        if ours.shape != reference.shape:
            raise ValueError(f"GGUF check: {name} is {reference.shape} in the file, {param} is {ours.shape}")
        out[name] = float(np.abs(ours - reference).max())
    if not out:
        raise ValueError(f"GGUF check: none of {sorted(tensors or CHECKED_TENSORS)} found in {path.name}")
    return out


def architecture_of(reader: Any) -> str:
    """The ``general.architecture`` string of an open `gguf.GGUFReader`."""
    field = reader.fields.get("general.architecture")
    if field is None:
        return "unknown"
    return bytes(field.parts[field.data[0]]).decode()


def greedy_next_token(model: Any, tokenizer: Any, prompt: str) -> str:
    """The text of the greedy next token after ``prompt`` (the language model's sanity check)."""
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    return tokenizer.decode([int(logits.argmax())])
