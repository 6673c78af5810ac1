"""Load a model and its processor by HF id or local directory, pick its adapter, and say
what a store must record about it.

The family is found from the config (``model_type``), never from the name, so a
fine-tuned or renamed checkpoint of a supported architecture just works. `provenance`
names what was loaded so a store can be traced back to it: the id or path as given, the
hub commit (or a hash of the local weights), the attention implementation the model runs
with, and the versions of the libraries that computed the numbers.
"""

from __future__ import annotations

import hashlib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from mechhi.bundled import local_path, recorded_name
from mechhi.devices import resolve_device, resolve_dtype
from mechhi.models import adapter_class
from mechhi.models._common import AdapterError, VLMAdapter
from mechhi.models.zoo import CATALOG, default_out, provenance_hash, read_provenance

# accelerate's placement strategies over every visible device (and CPU memory past them)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# Local weights up to this size are hashed whole; larger ones by name, size and their
# first and last MiB (a 16 GB checkpoint is not read on every run).
FULL_HASH_BYTES = 2**30
VERSIONED = ("mechhi", "torch", "transformers", "nnsight")


def load(
    model_id: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    attn_implementation: str | None = None,
    device_map: str | dict | None = None,
) -> tuple[Any, VLMAdapter]:
    """(model in eval mode on ``device``, its adapter). ``model_id``: an HF id, a local
    directory, the bundled model's name ``mechhi/zoo/toy-qwen2vl``, or a built zoo model's
    name (``dinov2-smollm2``, see `resolve_model`).

    ``device_map`` (``auto``, ``balanced``, ``balanced_low_0``, ``sequential``, or an
    explicit {module: device} dict): a model larger than one GPU is split over every
    visible GPU (then CPU memory) by accelerate, whose hooks move each module's inputs to
    its device; ``device`` must then stay ``auto``.

    >>> model, adapter = load("Qwen/Qwen2-VL-2B-Instruct")            # doctest: +SKIP
    >>> model, adapter = load("Qwen/Qwen2-VL-72B-Instruct", device_map="auto")  # doctest: +SKIP
    """
    from transformers import AutoModelForImageTextToText

    source = resolve_model(model_id)
    torch_device = resolve_device(device)
    if device_map is not None:
        check_device_map(device_map, device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    family, _, processor = _family_config_processor(model_id, revision)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "revision": revision}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        model = AutoModelForImageTextToText.from_pretrained(source, device_map=device_map, **kwargs).eval()
    else:
        model = AutoModelForImageTextToText.from_pretrained(source, **kwargs).to(torch_device).eval()
    return model, family(model.config, processor)


def load_adapter(model_id: str | Path, *, revision: str | None = None) -> VLMAdapter:
    """The model's adapter from its config and processor alone, no weights: what checking
    a dataset against the model's processor needs (`mechhi dataset check --model`)."""
    family, config, processor = _family_config_processor(model_id, revision)
    return family(config, processor)


def _family_config_processor(model_id: str | Path, revision: str | None) -> tuple[type[VLMAdapter], Any, Any]:
    from transformers import AutoConfig, AutoProcessor

    source = resolve_model(model_id)
    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as error:
        hint = "" if Path(source).exists() else " (not a local directory; hub downloads need network access)"
        raise AdapterError(
            f"cannot load model config from {str(model_id)!r}{hint}: {error}".splitlines()[0]
        ) from None
    return adapter_class(config), config, AutoProcessor.from_pretrained(source, revision=revision)


def resolve_model(model_id: str | Path) -> str:
    """Where a model name points: the bundled toy's folder, a zoo catalog name's built
    folder (``mechhi zoo build NAME``; a local folder of that name wins), else the id or
    path unchanged. A zoo name that is not built yet fails with the command that builds it."""
    source = local_path(model_id)
    name = str(model_id)
    if name in CATALOG and not Path(source).exists():
        folder = default_out(name)
        if read_provenance(folder) is None:
            raise AdapterError(f"model {name} is not built: run `mechhi zoo build {name}`")
        return str(folder)
    return source


def check_device_map(device_map: str | dict, device: str) -> None:
    """A known placement strategy, and no ``--device`` beside it (the map places the model)."""
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise AdapterError(f"unknown --device-map {device_map!r}; choose {', '.join(DEVICE_MAPS)}")
    if device != "auto":
        raise AdapterError(
            f"--device-map {device_map if isinstance(device_map, str) else 'dict'} places the model "
            f"on its devices itself; drop --device {device}"
        )


def input_device(model: Any) -> torch.device:
    """Where a model's inputs go: the device of its input embeddings (the first module to
    use the token ids); for a model on one device, that device."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def provenance(model_id: str | Path, model: Any) -> dict[str, Any]:
    """What a store records about a loaded model.

    ``model``: the id or path as given (the bundled model by its name); ``model_revision``:
    the hub commit the files came from, else a hash of a local directory's weights
    (``sha256:...`` of the whole files, ``sha256-sampled:...`` of large ones, see
    `weights_fingerprint`); for a zoo build, ``zoo-build:sha256:...`` of its provenance.json
    (which holds the weight files' SHA-256 and every source); else "";
    ``attn_implementation``: what the model runs with
    (sdpa, eager, flash_attention_2, ...); ``versions``: mechhi, torch, transformers, nnsight.
    """
    commit = getattr(model.config, "_commit_hash", None)
    directory = Path(resolve_model(model_id))
    if directory.is_dir() and read_provenance(directory) is not None:
        # a zoo build: its provenance.json names every source and the weight files' SHA-256
        revision = f"zoo-build:{provenance_hash(directory)}"
    else:
        revision = commit or (weights_fingerprint(directory) if directory.is_dir() else "")
    return {
        "model": recorded_name(model_id),
        "model_revision": revision,
        "attn_implementation": str(getattr(model.config, "_attn_implementation", None) or ""),
        "versions": library_versions(),
    }


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries whose code computes a store's numbers."""
    out = {}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed as a package"
    return out


def weights_fingerprint(directory: Path) -> str:
    """A content hash of a local model directory: config.json and every weight file.

    Whole files when they total at most ``FULL_HASH_BYTES`` (``sha256:<hex>``); beyond
    that each file's name, size and first and last MiB (``sha256-sampled:<hex>``), which
    tells checkpoints apart in practice without reading gigabytes on every run.
    """
    files = sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    )
    whole = sum(p.stat().st_size for p in files) <= FULL_HASH_BYTES
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}\t{size}\n".encode())
        with path.open("rb") as fh:
            if whole:
                digest.update(hashlib.file_digest(fh, "sha256").digest())
            else:
                digest.update(fh.read(2**20))
                fh.seek(max(0, size - 2**20))
                digest.update(fh.read())
    return f"{'sha256' if whole else 'sha256-sampled'}:{digest.hexdigest()[:16]}"
