"""Idefics3 and SmolVLM: an image split into square tiles plus one downscaled global image.

What the processor does (transformers 5.x ``Idefics3ImageProcessor``; SmolVLM's is the
same code, generated from it):

1. resize so the longest edge is ``size["longest_edge"]`` (up- or down-scaling);
2. resize again so both sides are multiples of the tile side
   ``M = max_image_size["longest_edge"]`` (a slight anisotropic stretch);
3. if either side exceeds M, cut the result into n_rows x n_cols tiles of M x M,
   row-major, and append the *whole* resized image squashed to M x M (the global image).
   Otherwise the image is only squashed to M x M (no tiles). With
   ``do_image_splitting=False`` every image is squashed to M x M.

Each M x M image becomes (M / patch)^2 vision patches, pixel-shuffled by
``scale_factor`` s into ``image_seq_len`` = k^2 tokens, k = M / (patch * s), in row-major
order inside the tile (the shuffle groups s x s neighbouring patches and keeps the
(row, col) order of the groups). The text holds, per tile,
``<fake_token_around_image><row_r_col_c>`` + k^2 ``<image>``, a newline after each tile
row, then ``<fake_token_around_image><global-img>`` + k^2 ``<image>``. The model
scatters the image features into the ``<image>`` positions in sequence order, which is
the order of ``pixel_values`` (tiles, then the global image).

Views. Every resize covers the whole image (no crop), so both grids span the original
image box (0, 0, width, height), each cell an equal share of it:

- ``"image"``: the tile mosaic, (n_rows * k) x (n_cols * k) tokens, re-ordered from the
  sequence's tile-major order into mosaic row-major order. Tiles are placed by the
  ``<row_r_col_c>`` marker in front of each, so a tokenizer that does not keep the
  markers whole is an error rather than a silently wrong grid;
- ``"global"``: the k x k global image.

Whether an image is split depends only on the processor's settings, never on the
image: step 1 always brings the longest edge to ``size["longest_edge"]``, so images are
split iff ``do_image_splitting`` and ``size["longest_edge"] > M``. An unsplit image has
only the global image; it is then the main grid and is reported as the single view
``"image"`` (no duplicate ``"global"``, so no view is counted twice in IoU). The view
set is therefore fixed per processor, as a store needs: `view_names` says which.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mechhi.models._common import AdapterError, VisualView, VLMAdapter

GLOBAL_TOKEN = "<global-img>"
MAX_TILES_PER_SIDE = 6  # the processors register <row_r_col_c> for r, c <= 6


def tile_marker(row: int, col: int) -> str:
    """The token in front of tile (row, col), 0-based arguments, 1-based in the text."""
    return f"<row_{row + 1}_col_{col + 1}>"


class Idefics3Adapter(VLMAdapter):
    family = "idefics3"
    model_types = ("idefics3", "smolvlm")
    decoder_layers = "model.text_model.layers"
    vision_tower = "model.vision_model"

    def __init__(self, config: Any, processor: Any) -> None:
        super().__init__(config, processor)
        seq_len = int(getattr(processor, "image_seq_len", 0))
        vision = config.vision_config
        expected = (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2
        if seq_len != expected:
            raise AdapterError(
                f"idefics3: processor.image_seq_len={seq_len} but the model makes {expected} tokens per tile"
            )
        self.tile_side = math.isqrt(seq_len)  # k: tokens per tile side
        if self.tile_side**2 != seq_len:
            raise AdapterError(f"idefics3: image_seq_len={seq_len} is not a square number of tokens")
        self.image_seq_len = seq_len
        ids = self.tokenizer.convert_tokens_to_ids
        global_token = getattr(processor, "global_image_tag", None) or getattr(
            processor, "global_image_token", GLOBAL_TOKEN
        )
        self.global_token_id = ids(global_token)
        side = max(MAX_TILES_PER_SIDE, self._max_tiles_per_side())
        markers = {ids(tile_marker(r, c)): (r, c) for r in range(side) for c in range(side)}
        markers.pop(self.tokenizer.unk_token_id, None)  # markers the vocabulary lacks
        self.tile_markers: dict[int, tuple[int, int]] = markers

    def _max_tiles_per_side(self) -> int:
        image_processor = self.processor.image_processor
        longest, tile = image_processor.size["longest_edge"], image_processor.max_image_size["longest_edge"]
        return math.ceil(longest / tile)

    def splits_images(self) -> bool:
        """Whether this processor cuts images into tiles (the same answer for every image)."""
        image_processor = self.processor.image_processor
        tile = image_processor.max_image_size["longest_edge"]
        return bool(image_processor.do_image_splitting) and image_processor.size["longest_edge"] > tile

    def view_names(self) -> tuple[str, ...]:
        """The views every sample gets with this processor."""
        return ("image", "global") if self.splits_images() else ("image",)

    def visual_views(self, inputs: dict, index: int, image_size: tuple[int, int]) -> list[VisualView]:
        ids = inputs["input_ids"][index].numpy()
        chunks = self._image_chunks(ids, self.image_token_positions(inputs, index))  # (n_tiles + 1, k*k)
        k = self.tile_side
        width, height = image_size
        box = (0.0, 0.0, float(width), float(height))
        if ids[chunks[-1, 0] - 1] != self.global_token_id:
            raise AdapterError(f"idefics3: sample {index}: the last image is not marked {GLOBAL_TOKEN}")
        tiles = chunks[:-1]
        if bool(len(tiles)) != self.splits_images():
            raise AdapterError(
                f"idefics3: sample {index} has {len(tiles)} tiles but the processor "
                f"{'splits' if self.splits_images() else 'does not split'} images"
            )
        if not len(tiles):
            return [VisualView("image", chunks[-1], (k, k), box)]
        mosaic = self._mosaic(ids, tiles, index)  # (n_rows * k, n_cols * k)
        return [
            VisualView("image", mosaic.ravel(), mosaic.shape, box),
            VisualView("global", chunks[-1], (k, k), box),
        ]

    def _image_chunks(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Image-token positions cut into one row per image (tiles, then global)."""
        n = self.image_seq_len
        if len(positions) == 0 or len(positions) % n:
            raise AdapterError(
                f"idefics3: {len(positions)} image tokens is not a multiple of image_seq_len={n}"
            )
        chunks = positions.reshape(-1, n)
        if not np.all(chunks[:, -1] - chunks[:, 0] == n - 1):
            raise AdapterError("idefics3: an image's tokens are not contiguous in the sequence")
        return chunks

    def _mosaic(self, ids: np.ndarray, tiles: np.ndarray, index: int) -> np.ndarray:
        """Tile chunks placed by their <row_r_col_c> markers into one row-major token grid."""
        k = self.tile_side
        places = []
        for chunk in tiles:
            marker = int(ids[chunk[0] - 1])
            if marker not in self.tile_markers:
                token = self.tokenizer.convert_ids_to_tokens(marker)
                raise AdapterError(
                    f"idefics3: sample {index}: a tile is preceded by {token!r}, not <row_r_col_c>"
                )
            places.append(self.tile_markers[marker])
        n_rows = 1 + max(r for r, _ in places)
        n_cols = 1 + max(c for _, c in places)
        if sorted(places) != [(r, c) for r in range(n_rows) for c in range(n_cols)]:
            raise AdapterError(f"idefics3: sample {index}: tile markers {places} do not form a full grid")
        mosaic = np.empty((n_rows, n_cols, k, k), dtype=tiles.dtype)
        for (r, c), chunk in zip(places, tiles):
            mosaic[r, c] = chunk.reshape(k, k)  # row-major inside the tile
        return mosaic.transpose(0, 2, 1, 3).reshape(n_rows * k, n_cols * k)  # (R, k, C, k) -> rows, cols
