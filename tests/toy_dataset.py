"""A small dataset on disk for the trace tests: coloured squares on grey, one or two per
image, in seven image sizes (`SIZES`, height x width)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from mechhi.data.format import DatasetWriter, ImageRecord, KeyObject

SIZES = [(112, 140), (84, 84), (140, 112), (112, 112), (56, 168), (84, 112), (112, 84)]
COLOURS = ["red", "green", "blue", "yellow"]


def write_toy_dataset(root, n_images: int = 7, with_splits: bool = False) -> None:
    """Rectangles of known colour on grey, one or two objects per image."""
    rng = np.random.default_rng(0)
    with DatasetWriter(root) as writer:
        for i in range(n_images):
            height, width = SIZES[i % len(SIZES)]
            image = Image.new("RGB", (width, height), (128, 128, 128))
            draw = ImageDraw.Draw(image)
            objects = []
            for j in range(1 + i % 2):
                x0, y0 = int(rng.integers(0, width - 30)), int(rng.integers(0, height - 30))
                mask = np.zeros((height, width), bool)
                mask[y0 : y0 + 28, x0 : x0 + 28] = True
                colour = COLOURS[(i + j) % 4]
                draw.rectangle([x0, y0, x0 + 27, y0 + 27], fill=colour)
                objects.append(KeyObject.from_mask(str(j), f"a {colour} square", mask))
            split = ("trace" if i < 3 else "test") if with_splits else None
            record = ImageRecord(f"img{i:03d}", "", width, height, None, tuple(objects), split=split)
            writer.add(record, image)
