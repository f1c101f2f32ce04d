"""Generated images of any shape: smooth random fields, for timing and smoke tests without files.

Each image is low-resolution uniform noise upsampled bilinearly, so it has structure an
autoencoder can learn (unlike white noise) and costs nothing to store. The same ``split_seed``
gives the same images on every machine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from vae_experiments.data.base import ImageDataModule, TensorImages
from vae_experiments.data.checks import check_int

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


class SyntheticDataModule(ImageDataModule):
    """Generated smooth random images in memory; labels are all 0.

    Args:
        image_shape: (C, H, W) of every image, e.g. ``[3, 64, 64]`` for CelebA-sized timing.
        num_train, num_val, num_test: images per split.
        data_dir: Accepted for a uniform config and ignored.
        batch_size, num_workers, seed, split_seed, binarize, on_device: See
            :class:`ImageDataModule`.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_train: int,
        num_val: int,
        num_test: int,
        data_dir: str | os.PathLike[str],
        batch_size: int,
        num_workers: int,
        seed: int,
        split_seed: int,
        binarize: str,
        on_device: str | bool = "auto",
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            split_seed=split_seed,
            binarize=binarize,
            on_device=on_device,
        )
        shape = tuple(image_shape)
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise ValueError(
                f"data.image_shape must be [channels, height, width] with 1 or 3 channels, "
                f"got {list(image_shape)}"
            )
        self._image_shape = (
            check_int("image_shape[0]", shape[0], minimum=1),
            check_int("image_shape[1]", shape[1], minimum=1),
            check_int("image_shape[2]", shape[2], minimum=1),
        )
        self.sizes = {
            "train": check_int("num_train", num_train, minimum=1),
            "val": check_int("num_val", num_val, minimum=1),
            "test": check_int("num_test", num_test, minimum=1),
        }

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._image_shape

    def load_splits(self) -> dict[str, Dataset]:
        generator = torch.Generator().manual_seed(self.split_seed)
        splits = {}
        for name in ("train", "val", "test"):
            images = smooth_random_images(self.sizes[name], self.image_shape, generator)
            splits[name] = TensorImages(images, torch.zeros(len(images), dtype=torch.int64))
        return splits
