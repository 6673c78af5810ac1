"""DINOv2 from an ONNX export back into transformers' `Dinov2Model`, checked against onnxruntime.

The ONNX file is a torch export of a `Dinov2Model` (under ``backbone.``) with a head on
top. The export keeps the named initialisers of biases, norms, layer scales and tokens,
but every linear weight becomes an anonymous ``onnx::MatMul_N`` input of a node named
after its module (``/backbone/encoder/layer.0/mlp/fc1/MatMul``), stored transposed
(in, out). The position table is split in two anonymous initialisers: the CLS row
(consumed by a Concat) and the 37 x 37 patch rows (consumed by a Reshape before the
bicubic Resize). The mapping below reads all of that from the graph, never from
hard-coded initialiser numbers, and infers the config (depth, width, heads, eps) from it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

PREFIX = "backbone"
# transformers 5 names the attention projections like every other model; exports made
# with 4.x (this one) carry the old names. Applied only where the model lacks the old key.
RENAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ImportError(
            "reading the DINOv2 ONNX file needs `onnx`: pip install 'mechhi[pretrained]'"
        ) from None
    return onnx, numpy_helper


def onnx_state_dict(path: Path, prefix: str = PREFIX) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(a `Dinov2Model` state dict, its config fields) from the ONNX graph of an exported model."""
    onnx, numpy_helper = _onnx()
    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state: dict[str, np.ndarray] = {}
    for name, value in inits.items():  # named initialisers: biases, norms, layer scales, CLS token
        if name.startswith(prefix + "."):
            state[name[len(prefix) + 1 :]] = value
    pos_cls = pos_patches = None
    for node in graph.node:
        anonymous = [i for i in node.input if i in inits and not i.startswith(prefix + ".")]
        if not node.name.startswith(f"/{prefix}/") or not anonymous:
            continue
        if (
            node.op_type == "MatMul"
        ):  # /backbone/<module path>/MatMul -> <module>.weight, (in, out) -> (out, in)
            module = node.name[len(prefix) + 2 :].rsplit("/", 1)[0].replace("/", ".")
            state[f"{module}.weight"] = inits[anonymous[0]].T
        elif node.name.startswith(f"/{prefix}/embeddings/"):
            value = inits[anonymous[0]]
            if node.op_type == "Concat" and value.shape[:2] == (1, 1):
                pos_cls = value
            elif node.op_type == "Reshape" and value.ndim == 3 and value.shape[1] > 1:
                pos_patches = value
    if pos_cls is None or pos_patches is None:
        raise ValueError(f"{path}: no position table (CLS row + patch rows) found in the graph")
    state["embeddings.position_embeddings"] = np.concatenate([pos_cls, pos_patches], axis=1)
    hidden = state["embeddings.cls_token"].shape[-1]
    state.setdefault("embeddings.mask_token", np.zeros((1, hidden), np.float32))  # unused at inference
    config = infer_config(state, graph, prefix)
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}, config


def infer_config(state: dict[str, np.ndarray], graph: Any, prefix: str = PREFIX) -> dict[str, Any]:
    """`Dinov2Config` fields from the weights' shapes and the graph's constants."""
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    hidden = state["embeddings.cls_token"].shape[-1]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    side = math.isqrt(state["embeddings.position_embeddings"].shape[1] - 1)
    mlp = state["encoder.layer.0.mlp.fc1.weight"].shape[0]
    if mlp % hidden:
        raise ValueError(f"DINOv2 MLP width {mlp} is not a multiple of the hidden size {hidden}")
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": attention_heads(graph, hidden, prefix),
        "mlp_ratio": mlp // hidden,
        "patch_size": int(patch),
        "image_size": int(side * patch),
        "layer_norm_eps": layer_norm_eps(graph, prefix),
        "layerscale_value": 1.0,
        "use_swiglu_ffn": False,
        "num_channels": state["embeddings.patch_embeddings.projection.weight"].shape[1],
    }


def _constants(graph: Any, scope: str) -> list[np.ndarray]:
    _, numpy_helper = _onnx()
    out = []
    for node in graph.node:
        if node.op_type == "Constant" and node.name.startswith(scope):
            out.append(numpy_helper.to_array(node.attribute[0].t))
    return out


def layer_norm_eps(graph: Any, prefix: str = PREFIX) -> float:
    """The epsilon added to the variance in the final layernorm (the only scalar below 1e-3 there)."""
    small = [
        float(c) for c in _constants(graph, f"/{prefix}/layernorm/") if c.size == 1 and 0 < float(c) < 1e-3
    ]
    if not small:
        raise ValueError("no layer-norm epsilon found in the ONNX graph")
    return float(f"{np.float32(small[0]):.6g}")  # the float32 constant, as the float it was written from


def attention_heads(graph: Any, hidden: int, prefix: str = PREFIX) -> int:
    """Heads from the first layer's (batch, seq, heads, head_dim) reshape of the query
    (4.x exports write the heads, 5.x exports -1 and the head width)."""
    for node in graph.node:
        if node.op_type == "Reshape" and node.name.startswith(f"/{prefix}/encoder/layer.0/attention/"):
            for source in graph.node:
                if node.input[1] in source.output and source.op_type == "Concat":
                    dims = [_constant_value(graph, i) for i in source.input]
                    if len(dims) == 4 and dims[2] and dims[2] > 0:
                        return int(dims[2])
                    if len(dims) == 4 and dims[2] == -1 and dims[3] and dims[3] > 0:
                        return hidden // int(dims[3])
    raise ValueError("no attention-head count found in the ONNX graph")


def _constant_value(graph: Any, name: str) -> int | None:
    """The integer of a Constant node (or an Unsqueeze of one) that outputs ``name``."""
    _, numpy_helper = _onnx()
    for node in graph.node:
        if name in node.output:
            if node.op_type == "Constant":
                value = numpy_helper.to_array(node.attribute[0].t)
                return int(value.reshape(-1)[0]) if value.size == 1 else None
            if node.op_type == "Unsqueeze":
                return _constant_value(graph, node.input[0])
    return None


def renamed_for(model: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` under the parameter names ``model`` uses (old 4.x attention names -> new)."""
    expected = set(model.state_dict())
    out = {}
    for key, value in state.items():
        if key not in expected:
            for old, new in RENAMES.items():
                key = key.replace(old, new)
        out[key] = value
    return out


def dinov2_from_onnx(path: Path) -> Any:
    """A `Dinov2Model` (eval, float32) holding the ONNX file's backbone weights; every
    weight of the model must come from the file (strict)."""
    from transformers import Dinov2Config, Dinov2Model

    state, fields = onnx_state_dict(path)
    model = Dinov2Model(Dinov2Config(**fields)).eval()
    model.load_state_dict(renamed_for(model, state), strict=True)
    return model


def backbone_output(graph: Any, prefix: str = PREFIX) -> str:
    """The tensor the backbone's final layernorm produces (its last node's output)."""
    nodes = [n for n in graph.node if n.name.startswith(f"/{prefix}/layernorm/")]
    if not nodes:
        raise ValueError(f"no /{prefix}/layernorm/ nodes in the ONNX graph")
    return nodes[-1].output[0]


def check_against_onnxruntime(model: Any, path: Path, *, size: int = 224, seed: int = 0) -> float:
    """Max |Dinov2Model.last_hidden_state - onnxruntime's backbone output| on one seeded
    normalised image of ``size`` px: the graph is cut at the backbone's final layernorm."""
    onnx, _ = _onnx()
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("the ONNX check needs `onnxruntime`: pip install 'mechhi[pretrained]'") from None
    proto = onnx.load(str(path))
    output = backbone_output(proto.graph)
    del proto.graph.output[:]
    proto.graph.output.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = onnxruntime.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    pixels = np.random.default_rng(seed).standard_normal((1, 3, size, size)).astype(np.float32)
    (reference,) = session.run([output], {session.get_inputs()[0].name: pixels})
    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    if ours.shape != reference.shape:
        raise ValueError(f"DINOv2 check: shapes differ, {ours.shape} vs onnxruntime {reference.shape}")
    return float(np.abs(ours - reference).max())
