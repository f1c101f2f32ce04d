"""Any folder of PNG/JPEG images, optionally grouped in class subfolders."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from vae_experiments.data.checks import as_path, at_least, one_of, split_size
from vae_experiments.data.errors import DataNotFoundError
from vae_experiments.data.file_source import FileSource
from vae_experiments.data.files import ImageFiles, ResizeCenterCrop
from vae_experiments.data.splits import carve_splits

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def collect_images(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """Find images under ``root`` recursively, in sorted (deterministic) order.

    Hidden files and folders (names starting with ".", e.g. macOS ``._x.jpg`` forks) are skipped.

    Returns:
        (paths, labels, class names): the label of a file is the index of its top-level
        subfolder among the sorted subfolders holding images; files directly in ``root`` get 0.
    """
    paths = []
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]  # prune in place
        paths += [
            Path(directory, name)
            for name in files
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS
        ]
    paths.sort()
    relative = [p.relative_to(root).parts for p in paths]
    class_names = sorted({parts[0] for parts in relative if len(parts) > 1})
    index = {name: i for i, name in enumerate(class_names)}
    labels = [index[parts[0]] if len(parts) > 1 else 0 for parts in relative]
    return paths, labels, class_names


class ImageFolder(FileSource):
    """Images under ``path``, resized (shorter side) and center-cropped to squares.

    The test split is carved first, then val from the rest, both seeded by ``split_seed``, from
    the list of files before any unreadable one is skipped (so skipping does not move images
    between splits).

    Args:
        path: Folder searched recursively for .png/.jpg/.jpeg files (any case).
        image_size: Output side S; images are (channels, S, S).
        channels: 1 (grayscale) or 3 (RGB).
        val_size: Validation images: int count, or float fraction of the non-test images.
        test_size: Test images: int count, or float fraction of all images.
        cache, cache_dir, skip_corrupt, alpha_background, min_size: See :class:`FileSource`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        image_size: int,
        channels: int,
        val_size: int | float,
        test_size: int | float,
        cache: bool,
        cache_dir: str | os.PathLike[str],
        skip_corrupt: bool,
        alpha_background: int,
        min_size: int,
    ) -> None:
        super().__init__(cache, cache_dir, skip_corrupt, alpha_background, min_size)
        self.path = as_path("path", path)
        self.image_size = at_least("image_size", image_size, 1)
        self.channels = one_of("channels", channels, (1, 3))
        self.val_size = split_size("val_size", val_size)
        self.test_size = split_size("test_size", test_size)
        self._found: tuple[list[Path], list[int], list[str]] | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def carved_sizes(self) -> dict[str, int | float]:
        return {"test_size": self.test_size, "val_size": self.val_size}

    def cache_name(self, split: str) -> str:
        mode = "rgb" if self.channels == 3 else "gray"
        return f"folder-{self.path.resolve().name}-{split}-{mode}-{self.image_size}px"

    @property
    def class_names(self) -> list[str] | None:
        """The top-level subfolders holding images, sorted; None when there are none (every
        label is 0). Lists the folder (once)."""
        return self._images()[2] or None

    def _images(self) -> tuple[list[Path], list[int], list[str]]:
        """:func:`collect_images` of the folder, listed once."""
        if self._found is not None:
            return self._found
        if not self.path.is_dir():
            what = "does not exist" if not self.path.exists() else "is a file"
            raise DataNotFoundError(
                f"data.source.path={self.path} is not a folder (it {what}); set "
                "data.source.path to the folder holding your images"
            )
        found = collect_images(self.path)
        if not found[0]:
            raise DataNotFoundError(
                f"no images found under data.source.path={self.path} (looked recursively for "
                f"{', '.join(IMAGE_EXTENSIONS)} in any case, skipping hidden files); put images "
                "there or point data.source.path at the folder that holds them"
            )
        paths, _, class_names = found
        log.info("found %d images in %d classes under %s", len(paths), len(class_names), self.path)
        self._found = found
        return found

    def list_files(self, split_seed: int) -> dict[str, ImageFiles]:
        paths, labels, _ = self._images()
        label_tensor = torch.tensor(labels, dtype=torch.int64)
        indices = carve_splits(
            len(paths), {"test": self.test_size, "val": self.val_size}, split_seed
        )
        transform = ResizeCenterCrop(self.image_size)
        return {
            name: ImageFiles(
                [paths[i] for i in idx.tolist()],
                label_tensor[idx],
                transform,
                self.channels,
                self.alpha_background,
            )
            for name, idx in indices.items()
        }
