"""Image files decoded on demand (CelebA, folders), and cheap checks that they are readable."""

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

from vae_experiments.data.errors import DataError

_MODES = {1: "L", 3: "RGB"}
# PIL modes of 16-bit (and wider) grayscale; "I" is how older Pillows open a 16-bit PNG.
_WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_JPEG_END = b"\xff\xd9"  # EOI marker: a JPEG cut short lacks it
_TAIL_BYTES = 1024


class CorruptImageError(DataError):
    """An image file that PIL cannot read; the message starts with the file's path."""

    def __init__(self, path: Path, reason: str, hint: str = "") -> None:
        message = f"{path}: image file is corrupt or unreadable ({reason})"
        super().__init__(f"{message}. {hint}" if hint else message)
        self.path = path
        self.reason = reason


def to_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image scaled to 8 bits ("L"), 0..65535 onto 0..255 with rounding.

    PIL's own conversion clips instead: everything above 255 would become white.
    """
    values = np.asarray(image, dtype=np.int64)
    return Image.fromarray(((values.clip(0, 65535) * 255 + 32767) // 65535).astype(np.uint8))


def convert_image(image: Image.Image, mode: str, alpha_background: int) -> Image.Image:
    """``image`` in ``mode`` ("L" or "RGB"), 16-bit values scaled and transparency composited.

    Args:
        image: As PIL opened it.
        mode: "L" or "RGB".
        alpha_background: Gray level 0..255 that transparent pixels are composited on (RGBA, LA,
            PA, and palette or single-colour transparency); PIL's ``convert`` would drop alpha.
    """
    if image.mode in _WIDE_GRAY_MODES:
        image = to_8_bit(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (alpha_background,) * 3 + (255,))
        image = Image.alpha_composite(background, rgba)
    return image.convert(mode)


class ImageFiles(Dataset):
    """Image files decoded with PIL a whole batch at a time (in DataLoader workers).

    Args:
        paths: One file per image.
        labels: int labels (N,).
        transform: PIL image -> PIL image of the final size (H, W), e.g. :class:`CenterCropResize`.
        channels: 1 (decoded as "L") or 3 (decoded as "RGB").
        alpha_background: Gray level 0..255 transparent pixels are composited on (see
            :func:`convert_image`).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        labels: Sequence[int] | Tensor,
        transform: Callable[[Image.Image], Image.Image],
        channels: int,
        alpha_background: int,
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
        self.alpha_background = alpha_background

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray:
        """Decode and transform one image to a uint8 array (H, W, C).

        Raises:
            CorruptImageError: PIL cannot decode the file (a ValueError naming the file).
        """
        return self.decode(index)[0]

    def decode(self, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        """Decode and transform one image: a uint8 array (H, W, C) and the file's (W, H).

        Raises:
            CorruptImageError: PIL cannot decode the file (a ValueError naming the file).
        """
        path = self.paths[index]
        try:
            with Image.open(path) as raw:
                size = raw.size
                image = convert_image(raw, _MODES[self.channels], self.alpha_background)
        except FileNotFoundError:
            raise
        except (OSError, SyntaxError, ValueError) as exc:
            # PIL signals broken files with all three; the path is what the user needs.
            raise CorruptImageError(path, str(exc)) from exc
        array = np.asarray(self.transform(image), dtype=np.uint8)
        return array.reshape(*array.shape[:2], self.channels), size

    def __getitem__(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Return uint8 images (B, C, H, W) and int64 labels (B,) for 1-D ``indices`` (B,)."""
        index_list = indices.tolist()
        batch = np.stack([self.load(i) for i in index_list])  # (B, H, W, C)
        images = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
        return images, self.labels[indices]

    def subset(self, keep: Sequence[int]) -> ImageFiles:
        """The same files and labels at positions ``keep`` (in that order)."""
        keep = list(keep)
        return ImageFiles(
            [self.paths[i] for i in keep],
            self.labels[keep],
            self.transform,
            self.channels,
            self.alpha_background,
        )


def find_damage(path: Path) -> tuple[str | None, tuple[int, int] | None]:
    """Cheaply check that an image file is complete; return what is wrong (None if fine) and
    its (W, H) from the header (None if unreadable).

    Reads the header (catches empty, HTML or otherwise non-image files), checks a PNG's chunk
    checksums (``Image.verify``), and looks for the end marker of a JPEG. Only a JPEG without
    its end marker is decoded in full, so files with trailing bytes after the marker are not
    rejected by mistake. Damage inside a complete JPEG's compressed data is not caught here:
    libjpeg often decodes it to wrong pixels without an error.
    """
    try:
        with Image.open(path) as image:
            image_format, size = image.format, image.size
            if image_format == "PNG":
                image.verify()
                return None, size
        if image_format == "JPEG":
            with path.open("rb") as f:
                f.seek(max(0, path.stat().st_size - _TAIL_BYTES))
                if _JPEG_END in f.read():
                    return None, size
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError, ValueError) as exc:  # includes FileNotFoundError
        return str(exc), None
    return None, size


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
