"""CelebA aligned faces (https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from vae_experiments.data.checks import as_path, at_least
from vae_experiments.data.errors import DataError, DataNotFoundError
from vae_experiments.data.file_source import FileSource, report_skipped
from vae_experiments.data.files import CenterCropResize, ImageFiles
from vae_experiments.targets import ConfigError

log = logging.getLogger(__name__)

ALIGNED_WIDTH = 178  # every img_align_celeba image is 178 x 218 (W x H)
PARTITION_FILES = ("list_eval_partition.txt", "list_eval_partition.csv")
PARTITION_SPLITS = {0: "train", 1: "val", 2: "test"}
HOW_TO_GET = (
    "Get CelebA from the official site (img_align_celeba.zip and list_eval_partition.txt from "
    "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html) or from Kaggle (`kaggle datasets download "
    "-d jessicali9530/celeba-dataset`), and unzip it into <data_dir>/celeba/. "
    "torchvision.datasets.CelebA(root, download=True) writes the same layout but often fails on "
    "Google Drive download quotas."
)


def read_partition(path: Path) -> list[tuple[str, int]]:
    """Parse ``list_eval_partition.txt`` ("000001.jpg 0") or Kaggle's ``.csv`` ("000001.jpg,0").

    Returns:
        (file name, partition) pairs in file order; partition 0=train, 1=val, 2=test.

    Raises:
        DataError: A line is not ``<image> <0|1|2>``, or the file lists no image.
    """
    entries = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.replace(",", " ").split()
        if not fields or (line_number == 1 and fields == ["image_id", "partition"]):
            continue
        if len(fields) != 2 or fields[1] not in {"0", "1", "2"}:
            raise DataError(
                f"{path}:{line_number}: expected '<image> <0|1|2>', got {line!r}: this is not "
                f"CelebA's partition list. Replace it with list_eval_partition.txt. {HOW_TO_GET}"
            )
        entries.append((fields[0], int(fields[1])))
    if not entries:
        raise DataError(
            f"{path} lists no images: it is empty or cut short. Replace it with "
            f"list_eval_partition.txt. {HOW_TO_GET}"
        )
    return entries


class CelebA(FileSource):
    """CelebA aligned faces, center-cropped and resized, with the official train/val/test split.

    Looks in ``<data_dir>/celeba/`` (torchvision's layout; Kaggle's nested
    ``img_align_celeba/img_align_celeba/`` and ``.csv`` partition also work), then in
    ``<data_dir>/`` itself. Labels are all 0. The official partition is used, so ``split_seed``
    plays no part.

    Args:
        data_dir: Root folder of the datasets.
        image_size: Output side S; images are (3, S, S).
        crop_size: Side of the central square cropped first (148 keeps the face, as in most
            CelebA VAE papers).
        cache, cache_dir, skip_corrupt, alpha_background, min_size: See :class:`FileSource`.
            With ``skip_corrupt``, images the partition file lists but the folder lacks are left
            out too.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        image_size: int,
        crop_size: int,
        cache: bool,
        cache_dir: str | os.PathLike[str],
        skip_corrupt: bool,
        alpha_background: int,
        min_size: int,
    ) -> None:
        super().__init__(cache, cache_dir, skip_corrupt, alpha_background, min_size)
        self.data_dir = as_path("data_dir", data_dir)
        self.image_size = at_least("image_size", image_size, 1)
        self.crop_size = at_least("crop_size", crop_size, 1)
        if crop_size > ALIGNED_WIDTH:
            raise ConfigError(
                "crop_size",
                crop_size,
                f"must be <= {ALIGNED_WIDTH} (the width of CelebA's aligned images)",
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def cache_name(self, split: str) -> str:
        return f"celeba-{split}-crop{self.crop_size}-{self.image_size}px"

    def find_files(self) -> tuple[Path, Path]:
        """Return (image folder, partition file).

        Raises:
            DataNotFoundError: Saying which of the two was found (and where), which is missing,
                where it was looked for, and how to get CelebA.
        """
        roots = list(dict.fromkeys([self.data_dir / "celeba", self.data_dir]))
        partitions, image_dirs = {}, {}
        for root in roots:
            partition = next((root / n for n in PARTITION_FILES if (root / n).is_file()), None)
            # Kaggle's zip nests the folder in a folder of the same name.
            nested = [root / "img_align_celeba" / "img_align_celeba", root / "img_align_celeba"]
            image_dir = next((d for d in nested if d.is_dir()), None)
            if partition is not None and image_dir is not None:
                return image_dir, partition
            if partition is not None:
                partitions[root] = partition
            if image_dir is not None:
                image_dirs[root] = image_dir
        where = " or ".join(str(root) for root in roots)
        list_names = " or ".join(PARTITION_FILES)
        if partitions and image_dirs:
            (partition, *_), (image_dir, *_) = partitions.values(), image_dirs.values()
            problem = (
                f"found its partition list {partition} and its image folder {image_dir}, but "
                "not side by side; move them into one folder"
            )
        elif partitions:
            root, partition = next(iter(partitions.items()))
            problem = (
                f"found its partition list {partition}, but its image folder is missing: no "
                f"{root / 'img_align_celeba'}/ (nor img_align_celeba/img_align_celeba/ from "
                f"Kaggle's zip); extract img_align_celeba.zip into {root}"
            )
        elif image_dirs:
            root, image_dir = next(iter(image_dirs.items()))
            problem = (
                f"found its image folder {image_dir}, but its partition list is missing: no "
                f"{list_names} in {root}; put list_eval_partition.txt (from the Eval folder "
                "of the CelebA site) there"
            )
        else:
            problem = (
                f"neither its image folder (img_align_celeba/) nor its partition list "
                f"({list_names}) is in {where}"
            )
        raise DataNotFoundError(
            f"CelebA not found under data.source.data_dir={self.data_dir}: {problem}. {HOW_TO_GET}"
        )

    def list_files(self, split_seed: int) -> dict[str, ImageFiles]:
        image_dir, partition_file = self.find_files()
        entries = read_partition(partition_file)
        # One directory listing instead of 200k stat calls.
        present = set(os.listdir(image_dir))
        if not any(name.lower().endswith(".jpg") for name in present):
            raise DataNotFoundError(
                f"the CelebA image folder {image_dir} holds no .jpg files, but {partition_file} "
                f"lists {len(entries)}. Extract img_align_celeba.zip there. {HOW_TO_GET}"
            )
        missing = [name for name, _ in entries if name not in present]
        if missing and not self.skip_corrupt:
            raise DataNotFoundError(
                f"{len(missing)} of the {len(entries)} images listed in {partition_file} are "
                f"missing, the first is {image_dir / missing[0]}. Re-extract img_align_celeba, "
                f"or set data.source.skip_corrupt=true to train without them. {HOW_TO_GET}"
            )
        if missing:
            report_skipped([image_dir / name for name in missing], len(entries))
        log.info("reading CelebA from %s", image_dir)
        transform = CenterCropResize(self.crop_size, self.image_size)
        splits = {}
        for partition, split in PARTITION_SPLITS.items():
            paths = [image_dir / name for name, p in entries if p == partition and name in present]
            splits[split] = ImageFiles(paths, [0] * len(paths), transform, 3, self.alpha_background)
        return splits
