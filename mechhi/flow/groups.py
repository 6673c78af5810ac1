"""Named token groups of one sample, from the adapter's layout.

A knockout or a patch names *where* in the sequence it acts. The names are one vocabulary
for every family, derived from the `SampleLayout` the adapter reports:

- ``description`` (alias ``answer``): the description (answer) tokens, the rows mechhi traces;
- ``last``: the position just before the answer, the one that predicts its first token;
- ``question``: every other text position before the answer (the prompt's words and the
  chat template around them);
- ``image``: every visual token, all views; ``image:<view>`` one view (Idefics3's ``global``);
- ``object``: the visual tokens any part of the object mask falls in (coverage > 0), all
  views; ``background``: the other visual tokens.

``object`` and ``background`` need the sample's mask carried onto the token grid (the same
coverage the store's ``mask`` holds); without a mask they are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mechhi.models import SampleLayout

GROUPS = ("description", "answer", "last", "question", "image", "object", "background")


class GroupError(ValueError):
    """A token group name that does not exist, or that this sample cannot have."""


@dataclass(frozen=True)
class TokenGroups:
    """Sequence positions of each named group of one sample."""

    positions: dict[str, np.ndarray]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.positions:
            raise GroupError(f"unknown token group {name!r}; groups: {', '.join(sorted(self.positions))}")
        return self.positions[name]


def token_groups(layout: SampleLayout, mask: np.ndarray | None = None) -> TokenGroups:
    """The groups of one sample; ``mask``: the object's (H, W) mask in original-image pixels."""
    answer = np.asarray(layout.query_positions, dtype=np.int64)
    first = int(answer.min())
    visual = np.concatenate([v.positions for v in layout.views]).astype(np.int64)
    before = np.arange(first, dtype=np.int64)
    groups: dict[str, np.ndarray] = {
        "description": answer,
        "answer": answer,
        "last": np.asarray([first - 1], dtype=np.int64),
        "question": np.setdiff1d(before[:-1], visual),
        "image": np.sort(visual),
    }
    for view in layout.views:
        groups[f"image:{view.name}"] = np.sort(view.positions.astype(np.int64))
    if mask is not None:
        covered = [v.positions[(v.coverage(mask) > 0).reshape(-1)] for v in layout.views]
        groups["object"] = np.sort(np.concatenate(covered).astype(np.int64))
        groups["background"] = np.setdiff1d(groups["image"], groups["object"])
    return TokenGroups(groups)


def check_group(name: str, *, views: tuple[str, ...] = ("image",)) -> str:
    """``name`` if it is a group name (``image:<view>`` for a known view), else a one-line error."""
    known = [*GROUPS, *(f"image:{v}" for v in views)]
    if name not in known:
        raise GroupError(f"unknown token group {name!r}; choose from {', '.join(known)}")
    return name
