"""Decode each image once per run: a bounded in-memory cache of decoded RGB images.

Training draws every sample many times (epochs, and one image carries several key
objects), validation and evaluation draw the same images again, and decoding a PNG or
JPEG each time is pure waste. The cache holds decoded images up to a byte budget
(width x height x 3 each), least recently used out first: the toy set (a few hundred
224 px images, about 0.15 MB each) fits whole; a large real dataset keeps what fits and
decodes the rest again as before, so memory stays bounded.

>>> cache = ImageCache()
>>> images = cache.images(samples)   # doctest: +SKIP
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from mechhi.data.format import Sample

DEFAULT_BUDGET = 2 * 1024**3  # bytes of decoded pixels (2 GiB)


class ImageCache:
    """Decoded images by file, least recently used out first once over ``budget`` bytes."""

    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        self.budget = budget
        self.held = 0  # bytes of the images held
        self.decoded = 0  # files decoded so far (a second decode of a file means it was evicted)
        self._images: OrderedDict[Path, Image.Image] = OrderedDict()

    def __len__(self) -> int:
        return len(self._images)

    def image(self, sample: Sample) -> Image.Image:
        """The sample's image as RGB (callers must not modify it: it is shared)."""
        key = sample.image_path
        if key in self._images:
            self._images.move_to_end(key)
            return self._images[key]
        image = sample.image()
        self.decoded += 1
        size = image.width * image.height * 3
        if size <= self.budget:
            self._images[key] = image
            self.held += size
            while self.held > self.budget:
                _, old = self._images.popitem(last=False)
                self.held -= old.width * old.height * 3
        return image

    def images(self, samples: Sequence[Sample]) -> list[Image.Image]:
        return [self.image(s) for s in samples]
