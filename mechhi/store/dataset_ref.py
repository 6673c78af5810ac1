"""How a store names the dataset it was traced on: ``attrs["dataset"]`` is
``<where>#<fingerprint>``.

``where`` is the bundled dataset's name or the directory's resolved absolute path, so the
store's dataset is found again from any working directory; ``fingerprint`` identifies the
content (`KeyObjectDataset.fingerprint`). Two runs are on the same dataset when their
fingerprints agree, whatever path named it: ``--dataset ds`` and ``--dataset /abs/ds`` of
one directory resume one store. Stores of earlier versions recorded the path as given
(possibly relative) and are read the same way; finding their directory again is
`mechhi.scoring.probe_scores.store_source`'s job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mechhi.bundled import BUNDLED_DATASET_ID, recorded_name


@dataclass(frozen=True)
class DatasetRef:
    """The dataset of a store: where it was (``where``) and what it held (``fingerprint``)."""

    where: str
    fingerprint: str | None = None

    @classmethod
    def of(cls, name: str | os.PathLike, fingerprint: str) -> DatasetRef:
        """What a new store records for ``--dataset name``: the bundled name, else the resolved path."""
        label = recorded_name(name)
        return cls(label if label == BUNDLED_DATASET_ID else str(Path(name).resolve()), fingerprint)

    @classmethod
    def parse(cls, attr: object) -> DatasetRef:
        """The store attribute read back; one without ``#fingerprint`` (hand-made stores) has
        none; a ``{"path", "fingerprint"}`` mapping is read as that pair."""
        if isinstance(attr, dict):
            fingerprint = attr.get("fingerprint")
            return cls(str(attr.get("path") or ""), str(fingerprint) if fingerprint else None)
        where, sep, fingerprint = str(attr or "").rpartition("#")
        return cls(where, fingerprint or None) if sep else cls(str(attr or ""), None)

    def __str__(self) -> str:
        return f"{self.where}#{self.fingerprint}" if self.fingerprint else self.where

    def same_content(self, other: DatasetRef) -> bool:
        """Whether two runs used the same dataset: by content where both know it, else by path."""
        if self.fingerprint and other.fingerprint:
            return self.fingerprint == other.fingerprint
        return os.path.normpath(self.where) == os.path.normpath(other.where)
