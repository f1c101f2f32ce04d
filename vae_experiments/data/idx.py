"""MNIST and Fashion-MNIST from IDX files (plain or gzipped), found on disk or downloaded.

IDX format (http://yann.lecun.com/exdb/mnist/): a big-endian magic number whose low byte is the
number of dimensions (0x0803 = uint8 images, 0x0801 = uint8 labels), one uint32 per dimension,
then the raw bytes.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import zlib
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vae_experiments.data.batches import TensorImages
from vae_experiments.data.checks import as_path, split_size
from vae_experiments.data.errors import DataError, DataNotFoundError
from vae_experiments.data.source import ImageSource
from vae_experiments.data.splits import carve

log = logging.getLogger(__name__)

_UINT8 = 0x08
_TYPE_NAMES = {
    0x08: "uint8",
    0x09: "int8",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}
NOT_SKIPPABLE = (
    "An IDX file is one array read whole, so data.source.skip_corrupt cannot skip part of it: "
    "replace the file."
)
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | os.PathLike[str]) -> Tensor:
    """Read an IDX file of uint8 values, e.g. images (N, H, W) or labels (N,), plain or gzipped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: The file is not IDX (bad magic number), holds another data type than
            uint8, or its size does not match its header (truncated, or a corrupt gzip stream);
            the message names the file and what is wrong.
    """
    path = Path(path)
    with path.open("rb") as f:
        is_gzip = f.read(2) == b"\x1f\x8b"  # sniff rather than trust the suffix
    try:
        with gzip.open(path, "rb") if is_gzip else path.open("rb") as f:
            data = f.read()
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(
            f"{path}: cannot read IDX file, its gzip stream is truncated or corrupt ({exc}). "
            f"{NOT_SKIPPABLE}"
        ) from exc
    if len(data) < 4:
        raise DataError(
            f"{path}: bad IDX magic number: the file holds only {len(data)} bytes. {NOT_SKIPPABLE}"
        )
    magic = int.from_bytes(data[:4], "big")
    type_code, ndim = data[2], data[3]
    if data[:2] != b"\x00\x00" or ndim == 0:
        raise DataError(
            f"{path}: bad IDX magic number 0x{magic:08x} (starts {data[:16]!r}); expected "
            "0x00000803 (uint8 images) or 0x00000801 (uint8 labels). Is this really an IDX "
            f"file, not e.g. an HTML page saved by a failed download? {NOT_SKIPPABLE}"
        )
    if type_code != _UINT8:
        type_name = _TYPE_NAMES.get(type_code, "an unknown type")
        raise DataError(
            f"{path}: bad IDX magic number 0x{magic:08x}: data type code 0x{type_code:02x} "
            f"({type_name}), but images and labels must be 0x08 (uint8). {NOT_SKIPPABLE}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{path}: IDX header is truncated: {len(data)} bytes, the {ndim} dimensions need "
            f"{header}. {NOT_SKIPPABLE}"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected, found = math.prod(shape), len(data) - header
    if found != expected:
        problem = "truncated" if found < expected else f"{found - expected} bytes too long"
        raise DataError(
            f"{path}: IDX file is {problem}: its header says shape {shape} ({expected} bytes "
            f"of data) but it holds {found} bytes. {NOT_SKIPPABLE}"
        )
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).reshape(shape)


def find_idx_files(directory: Path) -> dict[str, Path] | None:
    """Return the four IDX files in ``directory`` (plain preferred over .gz), or None if any lack."""
    found = {}
    for key, stem in IDX_FILES.items():
        candidates = [directory / stem, directory / f"{stem}.gz"]
        existing = [c for c in candidates if c.is_file()]
        if not existing:
            return None
        found[key] = existing[0]
    return found


class IdxImages(ImageSource):
    """28x28 grayscale IDX datasets: the train file minus ``val_size`` for val, t10k as test.

    Files are looked for in ``<data_dir>/<name>/raw/`` (torchvision's layout), then in
    ``<data_dir>`` itself (a folder holding the four files, like Debian's packages), then in
    :attr:`fallback_dirs`. Subclasses set :attr:`name`, :attr:`fallback_dirs` and :attr:`hint`.

    Args:
        data_dir: Root folder of the datasets.
        val_size: Validation images carved from the train file: an int count, or a float
            fraction of the file (so a subset of the 60k images keeps most of it for training).
        download: Let :meth:`prepare` download with torchvision when the files are missing.
    """

    #: torchvision dataset class, which is also the folder it downloads into
    #: (``<data_dir>/<name>/raw/``).
    name: ClassVar[str]
    #: Extra folders searched last (system-wide installs).
    fallback_dirs: ClassVar[tuple[Path, ...]] = ()
    #: Extra advice appended to the "files not found" error.
    hint: ClassVar[str] = ""
    #: What the labels 0..9 of the label files stand for.
    classes: ClassVar[tuple[str, ...]] = tuple(str(digit) for digit in range(10))

    def __init__(
        self, data_dir: str | os.PathLike[str], val_size: int | float, download: bool
    ) -> None:
        self.data_dir = as_path("data_dir", data_dir)
        self.val_size = split_size("val_size", val_size)
        self.download = download

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, 28, 28)

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    def carved_sizes(self) -> dict[str, int | float]:
        return {"val_size": self.val_size}

    def search_dirs(self) -> list[Path]:
        """Folders searched for the IDX files, in order."""
        dirs = [self.data_dir / self.name / "raw", self.data_dir, *self.fallback_dirs]
        return list(dict.fromkeys(dirs))  # drop duplicates, keep order

    def find_files(self) -> dict[str, Path] | None:
        """The four IDX files from the first folder holding all of them, or None."""
        for directory in self.search_dirs():
            files = find_idx_files(directory)
            if files is not None:
                return files
        return None

    def prepare(self, split_seed: int, threads: int) -> None:
        """Download with torchvision if allowed and the files are missing.

        Raises:
            DataNotFoundError: The download failed (offline, say): why, and the ways to get the
                files without one (see :meth:`not_found`).
        """
        if not self.download or self.find_files() is not None:
            return
        import torchvision.datasets  # slow import, only needed online

        log.info("downloading %s to %s", self.name, self.data_dir / self.name)
        try:
            # One call fetches all four files into <data_dir>/<name>/raw/.
            dataset = getattr(torchvision.datasets, self.name)
            dataset(root=str(self.data_dir), train=True, download=True)
        except (OSError, RuntimeError) as exc:
            # URLError, socket.gaierror and ConnectionError are OSErrors; torchvision gathers
            # the failures of its mirrors into one RuntimeError.
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise self.not_found(
                f"data.source.download=true could not download {self.name} (no network on "
                f"this machine?): {reason}"
            ) from None

    def how_to_get(self) -> str:
        """Where the files come from, for error messages."""
        return (
            f"Pass data.source.download=true when online (torchvision saves them to "
            f"{self.data_dir / self.name / 'raw'}), or put the four IDX files in one of "
            f"the folders searched{self.hint}."
        )

    def not_found(self, what_happened: str) -> DataNotFoundError:
        """The error for files that are not on disk: ``what_happened``, the folders searched and
        how to get the files (:meth:`how_to_get`), offline ways included; one line."""
        looked_in = ", ".join(str(d) for d in self.search_dirs())
        names = ", ".join(IDX_FILES.values())
        return DataNotFoundError(
            f"{what_happened}. Looked for {names} (each plain or .gz) in {looked_in}. "
            f"{self.how_to_get()}"
        )

    def load(self, split_seed: int, threads: int) -> dict[str, Dataset]:
        files = self.find_files()
        if files is None:
            raise self.not_found(f"{self.name} IDX files not found")
        log.info("reading %s from %s", self.name, files["train_images"].parent)
        train_images, train_labels = self._read_pair(files["train_images"], files["train_labels"])
        test_images, test_labels = self._read_pair(files["test_images"], files["test_labels"])
        splits = carve(train_images, train_labels, {"val": self.val_size}, split_seed)
        splits["test"] = TensorImages(test_images, test_labels)
        return splits

    def _read_pair(self, images_path: Path, labels_path: Path) -> tuple[Tensor, Tensor]:
        try:
            images, labels = read_idx(images_path), read_idx(labels_path)
        except DataError as exc:
            # Delete first: a download skips files that exist, broken or not.
            raise DataError(f"{exc} Delete it and get it again. {self.how_to_get()}") from exc
        if images.ndim != 3 or images.shape[1:] != self.image_shape[1:]:
            raise DataError(
                f"{images_path}: expected images of shape (N, 28, 28), got "
                f"{tuple(images.shape)}: this is not a {self.name} images file. Replace it with "
                f"the one from {self.name}. {self.how_to_get()}"
            )
        if labels.shape != (images.shape[0],):
            found = (
                f"{labels.shape[0]} labels" if labels.ndim == 1 else f"shape {tuple(labels.shape)}"
            )
            raise DataError(
                f"{labels_path}: expected {images.shape[0]} labels, one per image of "
                f"{images_path}, got {found}: the two files are not a pair (one of them is from "
                "another download or another split). Replace both with the four files of one "
                f"download of {self.name}. {self.how_to_get()}"
            )
        return images.unsqueeze(1), labels.long()  # (N, 1, 28, 28), (N,)


class MNIST(IdxImages):
    """Handwritten digits (LeCun et al.), 28x28 grayscale. See :class:`IdxImages`."""

    name = "MNIST"


class FashionMNIST(IdxImages):
    """Zalando's Fashion-MNIST (https://arxiv.org/abs/1708.07747). See :class:`IdxImages`."""

    name = "FashionMNIST"
    classes = (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    )
    fallback_dirs = (Path("/usr/share/datasets/fashion-mnist"),)
    hint = (
        "; on Debian/Ubuntu `apt-get install dataset-fashion-mnist` then "
        "data.source.data_dir=/usr/share/datasets/fashion-mnist"
    )
