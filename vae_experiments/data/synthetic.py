"""Generated images of any shape: smooth random fields, for timing and smoke tests without files.

Each image is low-resolution uniform noise upsampled bilinearly, so it has structure an
autoencoder can learn (unlike white noise) and costs nothing to store. The same ``split_seed``
gives the same images on every machine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from vae_experiments.data.batches import SPLIT_NAMES, TensorImages
from vae_experiments.data.checks import at_least
from vae_experiments.data.source import ImageSource
from vae_experiments.targets import ConfigError

#: Images generated per chunk, to bound the float32 memory of the upsampling.
_CHUNK = 4096


def smooth_random_images(
    num_images: int, image_shape: Sequence[int], generator: torch.Generator, cell: int = 8
) -> torch.Tensor:
    """``num_images`` uint8 images of ``image_shape`` (C, H, W): noise on a grid of ``cell``-pixel
    cells, upsampled bilinearly to (H, W)."""
    channels, height, width = image_shape
    coarse = (max(1, height // cell), max(1, width // cell))
    chunks = []
    for start in range(0, num_images, _CHUNK):
        count = min(_CHUNK, num_images - start)
        noise = torch.rand(count, channels, *coarse, generator=generator)
        images = F.interpolate(noise, size=(height, width), mode="bilinear", align_corners=False)
        chunks.append(images.mul_(255).round_().to(torch.uint8))
    if not chunks:
        return torch.empty(0, channels, height, width, dtype=torch.uint8)
    return torch.cat(chunks)


class Synthetic(ImageSource):
    """Generated smooth random images in memory; labels are all 0.

    Args:
        image_shape: (C, H, W) of every image, e.g. ``[3, 64, 64]`` for CelebA-sized timing.
        num_train, num_val, num_test: images per split.
    """

    def __init__(
        self, image_shape: Sequence[int], num_train: int, num_val: int, num_test: int
    ) -> None:
        shape = tuple(image_shape)
        if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1:
            raise ConfigError(
                "image_shape",
                list(image_shape),
                "must be [channels, height, width] with 1 or 3 channels and sizes >= 1",
            )
        self._image_shape = shape
        self.sizes = {
            "train": at_least("num_train", num_train, 1),
            "val": at_least("num_val", num_val, 1),
            "test": at_least("num_test", num_test, 1),
        }

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._image_shape

    def load(self, split_seed: int, threads: int) -> dict[str, Dataset]:
        generator = torch.Generator().manual_seed(split_seed)
        splits = {}
        for name in SPLIT_NAMES:
            images = smooth_random_images(self.sizes[name], self.image_shape, generator)
            splits[name] = TensorImages(images, torch.zeros(len(images), dtype=torch.int64))
        return splits
