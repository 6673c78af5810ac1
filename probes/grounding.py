"""Training-free grounding from a few heads' attention maps (Kang et al., CVPR 2025): sum
the chosen heads' maps, find the attended region, compare it with the object.

Per sample, on the main view's own grid (boxes need one grid; the tile mosaic for a model
that tiles): the chosen heads' maps summed (as they are: a head that looks more at the
image counts more), optionally smoothed by a Gaussian of ``sigma`` tokens
(`scipy.ndimage.gaussian_filter`), binarised at the map's mean, and the largest 8-connected
component kept (ties: the one holding more attention). Its bounding box is compared with
the object's, and its tokens with the object's tokens:

- the object's tokens are Head Impact's binarised mask (`binarize_mask`: coverage >= 0.5,
  a small object keeps its best-covered token), the object's box their bounding box;
- ``box_iou``: IoU of the two boxes in token cells; ``mask_iou``: IoU of the component
  and the object's tokens. Accuracy = share of samples with IoU >= 0.5 (the usual
  grounding criterion). The store knows the object only per token, so both are at token
  resolution, not pixels.

NaN for a sample whose object covers no token or whose summed map is flat.

>>> result = ground(open_store("stores/toy.zarr"), [(5, 1), (6, 0)])   # doctest: +SKIP
>>> float(result.box_iou.mean()), result.attrs["box_accuracy"]         # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr
from scipy import ndimage

from mechhi.store import MAIN_VIEW, attention_name
from probes.head_impact import BinarizeRule, binarize_mask, iou
from probes.maps import done_samples, map_samples, own_grids

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
MEASURES = ("box_iou", "mask_iou")
IOU_HIT = 0.5

Box = tuple[int, int, int, int]  # row0, col0, row1, col1, inclusive token cells


def attended_region(summed: np.ndarray, sigma: float = 0.0) -> np.ndarray | None:
    """(r, c) bool: the largest 8-connected component of the (smoothed) map above its
    mean; None for a flat map.

    >>> m = np.zeros((4, 4)); m[0, 0] = 1; m[2:4, 2:4] = 1
    >>> int(attended_region(m).sum())
    4
    """
    if sigma < 0:
        raise ValueError(f"--smooth {sigma}: must be 0 (none) or a positive width in tokens")
    values = np.asarray(summed, dtype=np.float64)
    if sigma > 0:
        values = ndimage.gaussian_filter(values, sigma=sigma, mode="nearest")
    labelled, count = ndimage.label(values > values.mean(), structure=EIGHT_CONNECTED)
    if count == 0:
        return None
    ids = np.arange(1, count + 1)
    sizes = ndimage.sum_labels(np.ones_like(values), labelled, ids)
    weight = ndimage.sum_labels(values, labelled, ids)
    best = ids[np.lexsort((-weight, -sizes))[0]]
    return labelled == best


def bounding_box(mask: np.ndarray) -> Box | None:
    """Inclusive (row0, col0, row1, col1) of a 2-D bool mask's True cells; None if empty.

    >>> bounding_box(np.array([[0, 1, 1], [0, 0, 1]], bool))
    (0, 1, 1, 2)
    """
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())


def box_iou(a: Box, b: Box) -> float:
    """IoU of two inclusive token boxes (areas in cells).

    >>> box_iou((0, 0, 1, 1), (1, 1, 2, 2))
    0.14285714285714285
    """
    inter_rows = min(a[2], b[2]) - max(a[0], b[0]) + 1
    inter_cols = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(inter_rows, 0) * max(inter_cols, 0)

    def area(x: Box) -> int:
        return (x[2] - x[0] + 1) * (x[3] - x[1] + 1)

    return inter / (area(a) + area(b) - inter)


def sample_grounding(
    attention: dict[str, np.ndarray],
    coverage: dict[str, np.ndarray],
    layers: np.ndarray,
    heads: np.ndarray,
    sigma: float = 0.0,
    rule: BinarizeRule = BinarizeRule(),
) -> np.ndarray:
    """(box_iou, mask_iou) of one sample grounded by the heads (layers[i], heads[i])
    (positions along the store's layer and head dims)."""
    att, cov = own_grids(attention, coverage)[MAIN_VIEW]  # (L, H, r, c), (r, c)
    if np.isnan(att).any():
        raise ValueError("NaN attention inside the sample's grid")
    target = binarize_mask(cov.reshape(-1), rule).reshape(cov.shape)
    region = attended_region(att[layers, heads].astype(np.float64).sum(0), sigma)
    target_box = bounding_box(target)
    if region is None or target_box is None:
        return np.array([np.nan, np.nan])
    return np.array([box_iou(bounding_box(region), target_box), float(iou(region.ravel(), target.ravel()))])


def _summarise(values: np.ndarray, sample: np.ndarray, attrs: dict) -> xr.Dataset:
    """box_iou and mask_iou (sample), with each one's mean and accuracy at IoU >= 0.5 over
    the samples where it is defined in attrs."""
    data = {name: ("sample", values[:, i]) for i, name in enumerate(MEASURES)}
    result = xr.Dataset(data, coords={"sample": sample})
    attrs = {**attrs, "iou_hit": IOU_HIT}
    for i, name in enumerate(MEASURES):
        v = values[:, i][np.isfinite(values[:, i])]
        stem = name.removesuffix("_iou")
        attrs[f"{stem}_iou_mean"] = float(v.mean()) if v.size else None
        attrs[f"{stem}_accuracy"] = float((v >= IOU_HIT).mean()) if v.size else None
        attrs[f"{stem}_samples"] = int(v.size)
    result.attrs = attrs
    return result


def whole_image(ds: xr.Dataset, rule: BinarizeRule = BinarizeRule()) -> xr.Dataset:
    """The reference a grounding must beat: the whole grid as the region (its box IoU is
    the object's box's share of the image), in `ground`'s layout."""

    def kernel(attention: dict[str, np.ndarray], coverage: dict[str, np.ndarray]) -> np.ndarray:
        cov = own_grids(attention, coverage)[MAIN_VIEW][1]
        target = binarize_mask(cov.reshape(-1), rule).reshape(cov.shape)
        box = bounding_box(target)
        if box is None:
            return np.array([np.nan, np.nan])
        whole = (0, 0, cov.shape[0] - 1, cov.shape[1] - 1)
        return np.array([box_iou(whole, box), float(iou(np.ones(target.size, bool), target.ravel()))])

    values = map_samples(ds, done_samples(ds, "ground"), kernel, (len(MEASURES),))
    return _summarise(values, ds["sample"].values, {"heads": [], "smooth": 0.0})


def ground(
    ds: xr.Dataset, heads: Sequence[tuple[int, int]], sigma: float = 0.0, rule: BinarizeRule = BinarizeRule()
) -> xr.Dataset:
    """box_iou and mask_iou (sample) of grounding every traced sample by ``heads`` ((layer,
    head) labels); attrs: the heads, sigma, and each IoU's mean and accuracy at IoU >= 0.5
    over the samples where it is defined."""
    if not heads:
        raise ValueError("ground: no heads to ground with")
    attended_region(np.zeros((1, 1)), sigma)  # checks sigma before the pass
    done = done_samples(ds, "ground")
    if attention_name(MAIN_VIEW) not in ds.data_vars:
        raise ValueError("ground: the store has no attention maps (traced with --no-maps?)")
    layer_index, head_index = [], []
    for layer, head in heads:
        if layer not in ds["layer"].values or head not in ds["head"].values:
            raise ValueError(
                f"head {layer}:{head} is not in the store ({ds.sizes['layer']} layers x "
                f"{ds.sizes['head']} heads)"
            )
        layer_index.append(int(np.flatnonzero(ds["layer"].values == layer)[0]))
        head_index.append(int(np.flatnonzero(ds["head"].values == head)[0]))
    layers, head_positions = np.array(layer_index), np.array(head_index)

    def kernel(attention: dict[str, np.ndarray], coverage: dict[str, np.ndarray]) -> np.ndarray:
        return sample_grounding(attention, coverage, layers, head_positions, sigma, rule)

    values = map_samples(ds, done, kernel, (len(MEASURES),))
    attrs = {"heads": [[int(l), int(h)] for l, h in heads], "smooth": float(sigma)}
    return _summarise(values, ds["sample"].values, attrs)
