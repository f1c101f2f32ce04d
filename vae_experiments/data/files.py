"""Image files decoded on demand, for datasets too big to hold in memory (CelebA, folders)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

_MODES = {1: "L", 3: "RGB"}


class ImageFiles(Dataset):
    """Image files decoded with PIL a whole batch at a time (in DataLoader workers).

    Args:
        paths: One file per image.
        labels: int labels (N,).
        transform: PIL image -> PIL image of the final size (H, W), e.g. :class:`CenterCropResize`.
        channels: 1 (decoded as "L") or 3 (decoded as "RGB").
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        labels: Sequence[int] | Tensor,
        transform: Callable[[Image.Image], Image.Image],
        channels: int,
    ) -> None:
        if channels not in _MODES:
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (len(paths),):
            raise ValueError(f"need one label per path: {len(paths)} paths, labels {labels.shape}")
        self.paths = [Path(p) for p in paths]
        self.labels = labels
        self.transform = transform
        self.channels = channels

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray:
        """Decode and transform one image to a uint8 array (H, W, C).

        Raises:
            ValueError: PIL cannot decode the file (names the file).
        """
        path = self.paths[index]
        try:
            with Image.open(path) as raw:
                image = raw.convert(_MODES[self.channels])
        except FileNotFoundError:
            raise
        except (OSError, SyntaxError, ValueError) as exc:
            # PIL signals broken files with all three; the path is what the user needs.
            raise ValueError(f"{path}: image file is corrupt or unreadable ({exc})") from exc
        array = np.asarray(self.transform(image), dtype=np.uint8)
        return array.reshape(*array.shape[:2], self.channels)

    def __getitem__(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Return uint8 images (B, C, H, W) and int64 labels (B,) for 1-D ``indices`` (B,)."""
        index_list = indices.tolist()
        batch = np.stack([self.load(i) for i in index_list])  # (B, H, W, C)
        images = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
        return images, self.labels[indices]


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Crop the central ``size`` x ``size`` square (rounding like torchvision's CenterCrop)."""
    width, height = image.size
    left = round((width - size) / 2)
    top = round((height - size) / 2)
    return image.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class CenterCropResize:
    """Center crop ``crop_size``, then resize to ``image_size`` (bilinear, antialiased by PIL).

    A class rather than a lambda so DataLoader workers can pickle it.
    """

    crop_size: int
    image_size: int

    def __call__(self, image: Image.Image) -> Image.Image:
        cropped = center_crop(image, self.crop_size)
        return cropped.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)


@dataclass(frozen=True)
class ResizeCenterCrop:
    """Resize the shorter side to ``image_size`` (bilinear, antialiased), then center crop square."""

    image_size: int

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        scale = self.image_size / min(width, height)
        new_size = (
            max(self.image_size, round(width * scale)),
            max(self.image_size, round(height * scale)),
        )
        resized = image.resize(new_size, Image.Resampling.BILINEAR)
        return center_crop(resized, self.image_size)
