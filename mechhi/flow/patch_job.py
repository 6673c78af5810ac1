"""`mechhi patch`: which heads (or residual positions) carry what differs between a clean
and a corrupted image to the answer.

For each evaluation sample a clean / corrupted pair (`mechhi.flow.counterfactual`) is run,
and every site is patched from clean into corrupted, exactly (`mechhi.flow.patching`: one
forward per site, batched) or by its gradient estimate (`mechhi.flow.attribution`: one
forward and one backward for all heads). ``--method both`` runs the two and reports their
rank correlation over heads: how far the cheap estimate can stand in for the exact one.

Each sample's terms are cached under ``out`` (default: ``<store>.patch`` beside the store)
keyed by everything they depend on, so a rerun or a larger ``--limit`` computes only new
samples. The labelled result is written there too, one zarr per (method, change, sites,
positions): ``effect`` and ``se`` over (layer, head) or (layer, group), with the model,
change and samples in its attrs.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from scipy import stats

from mechhi.flow.attribution import attribute_heads
from mechhi.flow.counterfactual import CHANGES, make_pair
from mechhi.flow.groups import check_group
from mechhi.flow.patching import SITE_KINDS, Patcher, summarise
from mechhi.intervene.ablate import EvalData
from mechhi.intervene.session import Session, default_store
from mechhi.jsonfiles import write_json
from mechhi.progress import tracked
from mechhi.result_cache import ResultCache

METHODS = ("exact", "attribution", "both")
RESIDUAL_GROUPS = ("image", "object", "background", "question", "last", "description")


@dataclass(frozen=True)
class PatchConfig:
    """Defaults of `mechhi patch`: the bundled toy's demo store, held-out toy scenes recoloured."""

    store: str | None = None
    method: str = "exact"  # exact | attribution | both
    change: str = "colour"  # colour | shape | remove (toy world) | noise | blur (any dataset)
    sites: str = "heads"  # heads | residual
    positions: str = "all"  # heads: patch at every position, or at one token group's
    groups: tuple[str, ...] = RESIDUAL_GROUPS  # residual: the groups patched, one at a time
    dataset: str | None = None  # default: held-out toy-world scenes
    split: str = "test"
    limit: int | None = 20
    seed: int = 0  # the noise of --change noise
    batch_size: int = 16  # patched copies per forward
    out: str | None = None  # default: <store>.patch
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r}: choose from {', '.join(METHODS)}")
        if self.change not in CHANGES:
            raise ValueError(f"--change {self.change!r}: choose from {', '.join(CHANGES)}")
        if self.sites not in SITE_KINDS:
            raise ValueError(f"--sites {self.sites!r}: choose from {', '.join(SITE_KINDS)}")
        if self.sites == "residual" and self.method != "exact":
            raise ValueError("--sites residual is patched exactly only: use --method exact")
        if self.positions != "all":
            check_group(self.positions)
        for group in self.groups:
            check_group(group)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit {self.limit}: must be at least 1")

    def out_dir(self, store: Path) -> Path:
        return Path(self.out) if self.out else store.with_suffix(".patch")


def _terms_of(patcher: Patcher, method: str, config: PatchConfig, pair: Any) -> dict[str, Any]:
    if config.sites == "residual":
        terms = patcher.patch_residual(pair, config.groups)
    elif method == "exact":
        terms = patcher.patch_heads(pair, None if config.positions == "all" else config.positions)
    else:
        terms = attribute_heads(patcher, pair, None if config.positions == "all" else config.positions)
    return {
        "clean": terms["clean"],
        "corrupted": terms["corrupted"],
        "patched": np.asarray(terms["patched"]).tolist(),
    }


def _labelled(
    result: dict[str, np.ndarray], config: PatchConfig, ds: xr.Dataset, attrs: dict[str, Any]
) -> xr.Dataset:
    if config.sites == "heads":
        dims, coords = ("layer", "head"), {"layer": ds["layer"].values, "head": ds["head"].values}
    else:
        dims, coords = ("layer", "group"), {"layer": ds["layer"].values, "group": list(config.groups)}
    if "depth" in ds.coords:
        coords["depth"] = ("layer", ds["depth"].values)
    return xr.Dataset(
        {"effect": (dims, result["effect"]), "se": (dims, result["se"])},
        coords=coords,
        attrs={**attrs, "gap": float(result["gap"])},
    )


def top_cells(effect: xr.DataArray, n: int) -> list[dict[str, Any]]:
    """The ``n`` largest effects (NaN last) as records of their coordinates and value."""
    flat = effect.stack(cell=effect.dims)
    order = np.argsort(-np.nan_to_num(flat.values, nan=-np.inf))[:n]
    rows = []
    for i in order:
        cell = flat.isel(cell=int(i))
        rows.append({**{d: cell[d].item() for d in effect.dims}, "effect": float(cell.values)})
    return rows


def run_patch(
    config: PatchConfig = PatchConfig(),
    *,
    progress: bool = True,
    top: int = 10,
    loaded: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """Patch every site of every sample; see the module doc."""
    began = time.time()
    session = Session(
        Path(config.store) if config.store else default_store(),
        config.model,
        config.device,
        config.dtype,
        loaded,
        progress,
    )
    out = config.out_dir(session.store)
    cache = ResultCache(out / "cache")
    data = EvalData(config.dataset, config.split, config.limit, 0, progress)
    methods = ("exact", "attribution") if config.method == "both" else (config.method,)
    patcher: list[Patcher] = []
    terms: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    skipped: list[str] = []
    for sample in tracked(data.samples, f"patching ({config.method})", show=progress):
        for method in methods:
            fields = {
                "model": session.model_name,
                "numerics": session.numerics,
                "data": data.fields()["data"],
                "sample": [sample.image_id, sample.object_id],
                "method": method,
                "change": config.change,
                "sites": config.sites,
                "positions": config.positions,
                "groups": list(config.groups),
                "seed": config.seed,
            }

            def compute(method: str = method, sample: Any = sample) -> dict[str, Any]:
                if not patcher:
                    patcher.append(Patcher(*session.model, batch_size=config.batch_size))
                pair = make_pair(sample, config.change, dataset=data.directory, seed=config.seed)
                return _terms_of(patcher[0], method, config, pair)

            try:
                value, _ = cache.get_or_compute("patch", fields, compute)
            except ValueError as error:  # e.g. a scene where every colour is taken: no counterfactual
                skipped.append(f"sample {sample.index}: {error}")
                break
            terms[method].append(value)
    if not terms[methods[0]]:
        raise ValueError(f"no sample could be patched: {skipped[0] if skipped else 'no samples'}")
    attrs = {
        "model": session.model_name,
        "store": str(session.store),
        "dataset": str(data.directory),
        "change": config.change,
        "sites": config.sites,
        "positions": config.positions,
        "n_samples": len(terms[methods[0]]),
    }
    results: dict[str, Any] = {}
    for method in methods:
        labelled = _labelled(summarise(terms[method]), config, session.ds, {**attrs, "method": method})
        path = out / f"patch-{method}-{config.change}-{config.sites}-{config.positions}.zarr"
        with warnings.catch_warnings():  # the group names: a string coordinate, which zarr v3 calls unstable
            warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")
            labelled.to_zarr(path, mode="w", consolidated=False)
        results[method] = {
            "path": str(path),
            "gap": labelled.attrs["gap"],
            "top": top_cells(labelled["effect"], top),
            "effect": labelled["effect"].values.tolist(),
            "se": labelled["se"].values.tolist(),
        }
    report = {
        "config": asdict(config),
        **attrs,
        "methods": list(methods),
        "skipped": skipped,
        "results": results,
        "seconds": time.time() - began,
    }
    if len(methods) == 2:
        exact = np.asarray(results["exact"]["effect"], dtype=float).ravel()
        approx = np.asarray(results["attribution"]["effect"], dtype=float).ravel()
        keep = np.isfinite(exact) & np.isfinite(approx)
        rho = stats.spearmanr(exact[keep], approx[keep])
        report["agreement"] = {
            "spearman": float(rho.statistic),
            "p": float(rho.pvalue),
            "n_sites": int(keep.sum()),
        }
    return write_json(out / f"patch-{config.method}-{config.change}-{config.sites}.json", report)


def open_result(path: str | Path) -> xr.Dataset:
    """A labelled patching result written by `run_patch` (lazy)."""
    return xr.open_zarr(path, consolidated=False)
