"""What every image-file source (CelebA, folders) shares: the decoded cache, or checked files."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset

from vae_experiments.data.batches import TensorImages
from vae_experiments.data.cache import DecodedImages, cache_file, ensure_cache
from vae_experiments.data.checks import as_path, at_least
from vae_experiments.data.errors import DataError
from vae_experiments.data.files import CorruptImageError, ImageFiles, find_damage
from vae_experiments.data.parallel import map_chunks
from vae_experiments.data.source import ImageSource
from vae_experiments.targets import ConfigError

log = logging.getLogger(__name__)

SKIP_HINT = "Replace the file, or set data.source.skip_corrupt=true to leave unreadable images out."
_NAMES_SHOWN = 5


def report_skipped(skipped: Sequence[Path], total: int) -> None:
    """Log how many unreadable files were left out, and the first few of them.

    Raises:
        DataError: Every one of the ``total`` files was left out (nothing to train on), naming
            their folder, the first few files, why the first is unreadable and what to check.
    """
    if not skipped:
        return
    if len(skipped) >= total:
        raise DataError(_none_readable(skipped))
    shown = ", ".join(str(p) for p in skipped[:_NAMES_SHOWN])
    more = f" and {len(skipped) - _NAMES_SHOWN} more" if len(skipped) > _NAMES_SHOWN else ""
    log.warning(
        "skipped %d of %d image files as corrupt or unreadable "
        "(data.source.skip_corrupt=true): %s%s",
        len(skipped),
        total,
        shown,
        more,
    )


def _none_readable(skipped: Sequence[Path]) -> str:
    """The message for a source whose every file was left out as unreadable."""
    skipped = sorted(skipped)
    folder = Path(os.path.commonpath(skipped))
    if folder in skipped:  # a single file
        folder = folder.parent
    names = ", ".join(str(p.relative_to(folder)) for p in skipped[:_NAMES_SHOWN])
    more = f" and {len(skipped) - _NAMES_SHOWN} more" if len(skipped) > _NAMES_SHOWN else ""
    reason, _ = find_damage(skipped[0])  # one file: cheap, and the cause is what the user needs
    why = f" ({skipped[0].name}: {reason})" if reason else ""
    return (
        f"all {len(skipped)} image files were skipped as corrupt or unreadable "
        f"(data.source.skip_corrupt=true), so there is no image to train on: under {folder}: "
        f"{names}{more}{why}. Check that these are "
        "images PIL can open (`file <name>` shows an HTML error page, a Git LFS pointer or a "
        "cut-short download) and that data.source points at the folder of the real images"
    )


def report_sizes(
    small: Sequence[Path], undersized: int, total: int, min_size: int, side: int
) -> None:
    """Log, once per load, the images left out by ``min_size`` and those upscaled."""
    if small:
        shown = ", ".join(str(p) for p in small[:_NAMES_SHOWN])
        more = f" and {len(small) - _NAMES_SHOWN} more" if len(small) > _NAMES_SHOWN else ""
        log.info(
            "left out %d of %d images whose shorter side is below data.source.min_size=%d: %s%s",
            len(small),
            total,
            min_size,
            shown,
            more,
        )
    if undersized:
        log.warning(
            "%d of %d images are smaller than image_size=%d (shorter side) and are upscaled; "
            "set data.source.min_size to leave out images below a size",
            undersized,
            total,
            side,
        )


class FileSource(ImageSource):
    """Base of sources made of image files, decoded with PIL.

    With ``cache=true`` every split is decoded once into a memory-mapped uint8 array under
    ``cache_dir`` (see :mod:`vae_experiments.data.cache`), built in :meth:`prepare` (or in
    :meth:`load` when nothing called it), and batches are tensor gathers like any in-memory
    dataset. With ``cache=false`` the files are decoded per batch in DataLoader workers (for
    folders too big for memory or disk); :meth:`load` then checks every file cheaply (see
    :func:`~vae_experiments.data.files.find_damage`) so a broken file fails before training.

    Subclasses implement :meth:`list_files` and :meth:`cache_name`, and build their
    :class:`ImageFiles` with :attr:`alpha_background`.

    Images smaller than the output side are counted (one warning with the count: they are
    upscaled); those whose shorter side is below ``min_size`` are left out of their split, after
    the splits are carved (so leaving them out moves no image between splits).

    Args:
        cache: Decode once into ``cache_dir`` (true) or decode per batch (false).
        cache_dir: Folder of the decoded caches; safe to delete at any time.
        skip_corrupt: Leave unreadable files out with a warning instead of raising.
        alpha_background: Gray level 0..255 that transparent pixels are composited on.
        min_size: Leave out images whose shorter side is below this many pixels; 0 keeps all.
    """

    def __init__(
        self,
        cache: bool,
        cache_dir: str | os.PathLike[str],
        skip_corrupt: bool,
        alpha_background: int,
        min_size: int,
    ) -> None:
        self.cache = cache
        self.cache_dir = as_path("cache_dir", cache_dir)
        self.skip_corrupt = skip_corrupt
        if isinstance(alpha_background, bool) or not 0 <= alpha_background <= 255:
            raise ConfigError(
                "alpha_background", alpha_background, "must be a gray level from 0 to 255"
            )
        self.alpha_background = alpha_background
        self.min_size = at_least("min_size", min_size, 0)
        self.split_paths: dict[str, list[Path]] = {}  # the files behind each split, in order
        self._files: dict[str, ImageFiles] | None = None
        self._decoded: dict[str, DecodedImages] | None = None

    def list_files(self, split_seed: int) -> dict[str, ImageFiles]:
        """Find the files of the "train", "val" and "test" splits (undecoded, unchecked).

        Args:
            split_seed: Seed of the val/test carving, where the source carves them.

        Raises:
            DataNotFoundError: The data is missing; names where it looked and how to get it.
        """
        raise NotImplementedError

    def cache_name(self, split: str) -> str:
        """Readable file-name prefix of a split's cache, e.g. ``celeba-train-crop148-64px``."""
        raise NotImplementedError

    def file_splits(self, split_seed: int) -> dict[str, ImageFiles]:
        """:meth:`list_files`, listed once."""
        if self._files is None:
            self._files = self.list_files(split_seed)
        return self._files

    def prepare(self, split_seed: int, threads: int) -> None:
        """Build the decoded caches (once per machine)."""
        if self.cache:
            self._decoded_splits(split_seed, threads)

    def _decoded_splits(self, split_seed: int, threads: int) -> dict[str, DecodedImages]:
        if self._decoded is None:
            decoded = {}
            for split, files in self.file_splits(split_seed).items():
                npy = cache_file(self.cache_dir, self.cache_name(split), files, self.min_size)
                try:
                    decoded[split] = ensure_cache(
                        files, npy, self.image_shape, self.skip_corrupt, threads, self.min_size
                    )
                except CorruptImageError as exc:
                    raise CorruptImageError(exc.path, exc.reason, SKIP_HINT) from exc
            self._decoded = decoded
        return self._decoded

    def load(self, split_seed: int, threads: int) -> dict[str, Dataset]:
        files = self.file_splits(split_seed)
        if self.cache:
            decoded = self._decoded_splits(split_seed, threads)
            splits: dict[str, Dataset] = {}
            for split, images in decoded.items():
                if images.skipped and not self.skip_corrupt:
                    raise CorruptImageError(
                        images.skipped[0],
                        f"left out of {images.path} when it was built with "
                        "data.source.skip_corrupt=true",
                        SKIP_HINT,
                    )
                splits[split] = TensorImages(images.images, files[split].labels[images.kept])
                self.split_paths[split] = [files[split].paths[i] for i in images.kept]
            skipped = [p for images in decoded.values() for p in images.skipped]
            small = [p for images in decoded.values() for p in images.small]
            undersized = sum(images.undersized for images in decoded.values())
        else:
            splits, skipped, small, undersized = {}, [], [], 0
            for split, split_files in files.items():
                checked, damaged, too_small, upscaled = self._check_files(
                    split, split_files, threads
                )
                splits[split] = checked
                self.split_paths[split] = checked.paths
                skipped += damaged
                small += too_small
                undersized += upscaled
        total = sum(len(f) for f in files.values())
        report_skipped(skipped, total)
        report_sizes(small, undersized, total, self.min_size, min(self.image_shape[1:]))
        return splits

    def _check_files(
        self, split: str, files: ImageFiles, threads: int
    ) -> tuple[ImageFiles, list[Path], list[Path], int]:
        """Return the readable files of a split at least ``min_size``, the damaged ones (raise
        unless skipping), those below ``min_size``, and how many kept ones are undersized."""

        def check(start: int, stop: int) -> list[tuple[int, str | None, tuple[int, int] | None]]:
            found = ((i, *find_damage(files.paths[i])) for i in range(start, stop))
            return [(i, reason, size) for i, reason, size in found]

        checked = map_chunks(check, len(files), threads, f"checking {split} images")
        damaged = [(i, reason) for i, reason, _ in checked if reason is not None]
        sizes = {i: min(size) for i, reason, size in checked if reason is None}
        if damaged and not self.skip_corrupt:
            first, reason = damaged[0]
            others = ""
            if len(damaged) > 1:
                names = ", ".join(str(files.paths[i]) for i, _ in damaged[1:_NAMES_SHOWN])
                others = f"{len(damaged) - 1} more in the {split} split, e.g. {names}. "
            raise CorruptImageError(files.paths[first], reason, others + SKIP_HINT)
        small = [i for i, side in sizes.items() if side < self.min_size]
        left_out = {i for i, _ in damaged} | set(small)
        readable = files.subset([i for i in range(len(files)) if i not in left_out])
        output_side = min(self.image_shape[1:])
        undersized = sum(self.min_size <= side < output_side for side in sizes.values())
        return (
            readable,
            [files.paths[i] for i, _ in damaged],
            [files.paths[i] for i in small],
            undersized,
        )
