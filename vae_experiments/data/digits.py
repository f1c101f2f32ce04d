"""scikit-learn's bundled 8x8 digits: 1797 images, works offline, for seconds-long smoke runs."""

from __future__ import annotations

import os

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch.utils.data import Dataset

from vae_experiments.data.base import ImageDataModule, TensorImages
from vae_experiments.data.checks import check_split_size
from vae_experiments.data.splits import carve_splits


def load_digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Return all digits as uint8 images (1797, 1, 8, 8) and int64 labels (1797,)."""
    digits = load_digits()
    # Pixel values are counts 0..16; rescale to the 0..255 range every source shares.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(digits.target).long()


class DigitsDataModule(ImageDataModule):
    """scikit-learn's ``load_digits()``; test carved first, then val from the rest.

    Args:
        data_dir: Accepted for a uniform config and ignored (the data ships with scikit-learn).
        val_size: Validation images: an int count, or a float fraction of the non-test images.
        test_size: Test images: an int count, or a float fraction of all images.
        batch_size, num_workers, seed, split_seed, binarize, on_device: See :class:`ImageDataModule`.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        batch_size: int,
        num_workers: int,
        seed: int,
        split_seed: int,
        val_size: int | float,
        test_size: int | float,
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
        self.val_size = check_split_size("val_size", val_size)
        self.test_size = check_split_size("test_size", test_size)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, 8, 8)

    def load_splits(self) -> dict[str, Dataset]:
        images, labels = load_digit_images()
        indices = carve_splits(
            len(images), {"test": self.test_size, "val": self.val_size}, self.split_seed
        )
        return {name: TensorImages(images[idx], labels[idx]) for name, idx in indices.items()}
