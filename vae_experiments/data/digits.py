"""scikit-learn's bundled 8x8 digits: 1797 images, works offline, for seconds-long smoke runs."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from vae_experiments.data.checks import split_size
from vae_experiments.data.source import ImageSource
from vae_experiments.data.splits import carve


def load_digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Return all digits as uint8 images (1797, 1, 8, 8) and int64 labels (1797,)."""
    from sklearn.datasets import load_digits  # a second to import: only when the data is read

    digits = load_digits()
    # Pixel values are counts 0..16; rescale to the 0..255 range every source shares.
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(digits.target).long()


class Digits(ImageSource):
    """scikit-learn's ``load_digits()``, images (1, 8, 8); test carved first, then val from the
    rest.

    Args:
        val_size: Validation images: an int count, or a float fraction of the non-test images.
        test_size: Test images: an int count, or a float fraction of all images.
    """

    def __init__(self, val_size: int | float, test_size: int | float) -> None:
        self.val_size = split_size("val_size", val_size)
        self.test_size = split_size("test_size", test_size)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, 8, 8)

    @property
    def class_names(self) -> list[str]:
        return [str(digit) for digit in range(10)]

    def carved_sizes(self) -> dict[str, int | float]:
        return {"test_size": self.test_size, "val_size": self.val_size}

    def load(self, split_seed: int, threads: int) -> dict[str, Dataset]:
        images, labels = load_digit_images()
        return carve(images, labels, {"test": self.test_size, "val": self.val_size}, split_seed)
