"""The real datasets of known factors, read from the files their authors publish.

- dSprites (Matthey et al. 2017), ``dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz``: ``imgs``
  uint8 (737280, 64, 64) of 0/1 and ``latents_classes`` int64 (737280, 6) whose first column,
  colour, is constant and is dropped: factors shape, scale, orientation, x, y.
- 3D Shapes (Burgess & Kim 2018), ``3dshapes.h5``: ``images`` uint8 (480000, 64, 64, 3) and
  ``labels`` float64 (480000, 6) of the factors' values (floor_hue, wall_hue, object_hue,
  scale, shape, orientation), turned into indices of each factor's sorted distinct values.
  Needs h5py (``pip install h5py``).

Labels are int64 (N, F) factor-value indices. ``keep`` takes a subset of each factor's values
(so that a 737,280-image file trains on a CPU); the kept values are indexed 0..n-1 again. The
images are read in chunks of rows, so a subset needs no more memory than it takes.

Plain numpy and torch; a file that is not in its format raises one-line
:class:`~vae_experiments.data.errors.DataError`.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vae_experiments.data.cache import source_fingerprint
from vae_experiments.data.errors import DataError, DataNotFoundError
from vae_experiments.targets import ConfigError

#: dSprites' factors after its constant colour; also the rendered shapes' factors.
DSPRITES_FACTORS = ("shape", "scale", "orientation", "x", "y")
SHAPES3D_FACTORS = ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
#: Bumped when reading changes what lands in a cache.
READER_VERSION = 1
#: Rows read at a time (64x64x3 bytes each: 50 MB).
_ROWS = 4096
H5PY_HINT = "pip install h5py (or pip install 'vae-experiments[h5]')"


def open_factor_file(path: Path, keep: Mapping[str, Any]) -> FactorFile:
    """The reader of ``path`` by its suffix: ``.npz`` dSprites, ``.h5``/``.hdf5`` 3D Shapes.
    Reads nothing yet.

    Raises:
        ConfigError: another suffix, a ``keep`` that names no factor of the format or is no
            count or index list, or an ``.h5`` without h5py installed.
    """
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return DSpritesFile(path, keep)
    if suffix in (".h5", ".hdf5"):
        try:
            import h5py  # noqa: F401
        except ImportError:
            raise ConfigError(
                "path",
                str(path),
                f"is a 3D Shapes .h5 file, and reading it needs h5py, which is not installed: "
                f"{H5PY_HINT}",
            ) from None
        return Shapes3DFile(path, keep)
    raise ConfigError(
        "path",
        str(path),
        "must be dSprites' .npz (dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz) or "
        "3D Shapes' .h5 (3dshapes.h5), or null to render the shapes",
    )


class FactorFile:
    """A file of images with factor labels, and the subset of its factor values kept.

    Subclasses set :attr:`kind`, :attr:`factor_names`, :attr:`image_shape`, and implement
    :meth:`_read_labels` (the file's own labels, int64 (N_file, F)) and :meth:`_chunks`.

    Args:
        path: The file.
        keep: Factor name -> a count of evenly spaced values, or a list of value indices.
    """

    kind: str
    factor_names: tuple[str, ...]
    image_shape: tuple[int, int, int]
    #: What the file holds, for messages: "dSprites .npz".
    format: str

    def __init__(self, path: Path, keep: Mapping[str, Any]) -> None:
        self.path = path
        unknown = sorted(set(keep) - set(self.factor_names))
        if unknown:
            raise ConfigError(
                f"keep.{unknown[0]}",
                allowed=f"{self.format} has no factor {unknown[0]}; its factors are "
                f"{', '.join(self.factor_names)}",
            )
        for name, spec in keep.items():
            is_count = isinstance(spec, int) and not isinstance(spec, bool) and spec >= 1
            is_list = (
                isinstance(spec, list)
                and len(spec) > 0
                and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in spec)
                and len(set(spec)) == len(spec)
            )
            if not (is_count or is_list):
                raise ConfigError(
                    f"keep.{name}",
                    spec,
                    "must be a count >= 1 (evenly spaced values) or a list of distinct value "
                    "indices >= 0",
                )
        self.keep = dict(keep)
        self._subset: tuple[np.ndarray, np.ndarray, tuple[int, ...]] | None = None

    # What subclasses provide.
    def _read_labels(self) -> np.ndarray:
        raise NotImplementedError

    def _chunks(self) -> Iterator[np.ndarray]:
        """The file's images in order, uint8 (rows, C, H, W) 0..255, a chunk of rows at a
        time."""
        raise NotImplementedError

    # What the source uses.
    @property
    def factor_sizes(self) -> tuple[int, ...]:
        return self._kept()[2]

    @property
    def num_images(self) -> int:
        return len(self._kept()[1])

    def labels(self) -> Tensor:
        """int64 (N, F): the kept images' factor-value indices, 0..size-1 per factor."""
        return torch.from_numpy(self._kept()[1].copy())

    def cache_meta(self) -> dict[str, Any]:
        """What decides the cached images: the file as it is now and the values kept."""
        rows, _, _ = self._kept()
        return {
            "reader": READER_VERSION,
            "file": str(self.path.resolve()),
            "fingerprint": source_fingerprint([self.path]),
            "keep": {name: self.keep[name] for name in sorted(self.keep)},
            "images": int(len(rows)),
        }

    def read_images(self, out: np.ndarray) -> None:
        """Writes the kept images, in order, into ``out`` (N, C, H, W)."""
        rows, _, _ = self._kept()
        wanted = np.zeros(self._file_count, dtype=bool)
        wanted[rows] = True
        start = done = 0
        for chunk in self._chunks():
            mask = wanted[start : start + len(chunk)]
            picked = chunk[mask]
            out[done : done + len(picked)] = picked
            done += len(picked)
            start += len(chunk)
        if start != self._file_count:
            raise DataError(
                f"{self.path}: holds {start} images but {self._file_count} labels: the file is "
                f"cut short or not one {self.format}; get it again"
            )

    def _kept(self) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
        """(rows of the file kept (N,), their labels re-indexed (N, F), values per factor)."""
        if self._subset is not None:
            return self._subset
        if not self.path.is_file():
            raise DataNotFoundError(
                f"{self.path}: no such file (data.source.path); give the path of "
                f"{self.format}, or data.source.path=null to render the shapes"
            )
        labels = self._read_labels()
        self._file_count = len(labels)
        mask = np.ones(len(labels), dtype=bool)
        sizes, columns = [], []
        for f, name in enumerate(self.factor_names):
            size = int(labels[:, f].max()) + 1 if len(labels) else 0
            kept = self._kept_values(name, size)
            mask &= np.isin(labels[:, f], kept)
            lookup = np.full(size, -1, dtype=np.int64)
            lookup[kept] = np.arange(len(kept))
            columns.append(lookup)
            sizes.append(len(kept))
        rows = np.flatnonzero(mask)
        relabelled = np.stack(
            [columns[f][labels[rows, f]] for f in range(len(self.factor_names))], axis=1
        ).astype(np.int64)
        if len(rows) == 0:
            raise DataError(f"{self.path}: no image has the factor values kept (data.source.keep)")
        self._subset = (rows, relabelled, tuple(sizes))
        return self._subset

    def _kept_values(self, name: str, size: int) -> np.ndarray:
        spec = self.keep.get(name)
        if spec is None:
            return np.arange(size)
        key = f"data.source.keep.{name}"
        if isinstance(spec, int):
            if spec > size:
                raise ConfigError(key, spec, f"{self.path} has {size} values of {name}")
            return np.unique(np.round(np.linspace(0, size - 1, spec)).astype(np.int64))
        if max(spec) >= size:
            raise ConfigError(
                key, spec, f"{self.path} has {size} values of {name}: indices 0 to {size - 1}"
            )
        return np.array(sorted(spec), dtype=np.int64)

    def _bad(self, problem: str) -> DataError:
        return DataError(
            f"{self.path}: {problem}; this is not {self.format} (data.source.path): get the "
            "original file again"
        )


class DSpritesFile(FactorFile):
    """dSprites' ``.npz``: ``imgs`` (N, 64, 64) 0/1 and ``latents_classes`` (N, 6)."""

    kind = "dsprites"
    factor_names = DSPRITES_FACTORS
    image_shape = (1, 64, 64)
    format = "a dSprites .npz (imgs, latents_classes)"

    def _read_labels(self) -> np.ndarray:
        if not zipfile.is_zipfile(self.path):
            with open(self.path, "rb") as f:
                head = f.read(16)
            raise self._bad(
                f"cannot read it as an .npz archive: it is no zip file (starts {head!r})"
            )
        try:
            with np.load(self.path) as npz:
                missing = [k for k in ("imgs", "latents_classes") if k not in npz.files]
                if missing:
                    raise self._bad(
                        f"it has no {' or '.join(missing)} (it holds {', '.join(npz.files)})"
                    )
                classes = npz["latents_classes"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            if isinstance(exc, DataError):
                raise
            # numpy's words for an array of Python objects advise unpickling it: never do.
            reason = "an array of Python objects" if "pickle" in str(exc) else str(exc)
            raise self._bad(f"cannot read it as an .npz archive ({reason})") from None
        if classes.ndim != 2 or classes.shape[1] != 6 or classes.dtype.kind not in "iu":
            raise self._bad(
                f"latents_classes is {classes.dtype} {classes.shape}, not integers (N, 6)"
            )
        if len(classes) and (classes.min() < 0 or (classes[:, 0] != classes[0, 0]).any()):
            raise self._bad("latents_classes has negative values or a colour column that varies")
        return classes[:, 1:].astype(np.int64)

    def _chunks(self) -> Iterator[np.ndarray]:
        # np.load would decompress all 3 GB of imgs at once: read the member row by row.
        fmt = np.lib.format
        with zipfile.ZipFile(self.path) as archive, archive.open("imgs.npy") as member:
            version = fmt.read_magic(member)
            reader: Callable[..., Any] = (
                fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            )
            shape, fortran, dtype = reader(member)
            if len(shape) != 3 or shape[1:] != (64, 64) or dtype != np.uint8 or fortran:
                raise self._bad(f"imgs is {dtype} {shape}, not uint8 (N, 64, 64)")
            if shape[0] != self._file_count:
                raise self._bad(
                    f"imgs has {shape[0]} images but latents_classes {self._file_count}"
                )
            row = 64 * 64
            for start in range(0, shape[0], _ROWS):
                count = min(_ROWS, shape[0] - start)
                data = member.read(count * row)
                if len(data) != count * row:
                    raise self._bad(f"imgs is cut short after {start} images")
                chunk = np.frombuffer(data, dtype=np.uint8).reshape(count, 1, 64, 64)
                # dSprites stores 0/1: scaled to the 0..255 every source shares.
                yield chunk * np.uint8(255) if chunk.max(initial=0) <= 1 else chunk


class Shapes3DFile(FactorFile):
    """3D Shapes' ``.h5``: ``images`` (N, 64, 64, 3) and ``labels`` (N, 6) of values."""

    kind = "3dshapes"
    factor_names = SHAPES3D_FACTORS
    image_shape = (3, 64, 64)
    format = "a 3D Shapes .h5 (images, labels)"

    def _open(self) -> Any:
        import h5py

        try:
            handle = h5py.File(self.path, "r")
        except OSError as exc:
            raise self._bad(f"cannot read it as an HDF5 file ({exc})") from None
        missing = [k for k in ("images", "labels") if k not in handle]
        if missing:
            names = ", ".join(handle.keys())
            handle.close()
            raise self._bad(f"it has no dataset {' or '.join(missing)} (it holds {names})")
        return handle

    def _read_labels(self) -> np.ndarray:
        with self._open() as handle:
            values = np.asarray(handle["labels"][:])
            images = handle["images"]
            if values.ndim != 2 or values.shape[1] != len(self.factor_names):
                raise self._bad(f"labels is {values.shape}, not (N, {len(self.factor_names)})")
            if images.ndim != 4 or images.shape[1:] != (64, 64, 3) or images.dtype != np.uint8:
                raise self._bad(
                    f"images is {images.dtype} {images.shape}, not uint8 (N, 64, 64, 3)"
                )
            if images.shape[0] != len(values):
                raise self._bad(f"images has {images.shape[0]} rows but labels {len(values)}")
        # Each factor's values, sorted, indexed 0..n-1 (as dSprites' latents_classes are).
        columns = [np.unique(values[:, f], return_inverse=True)[1] for f in range(values.shape[1])]
        return np.stack([c.reshape(-1) for c in columns], axis=1).astype(np.int64)

    def _chunks(self) -> Iterator[np.ndarray]:
        with self._open() as handle:
            images = handle["images"]
            for start in range(0, images.shape[0], _ROWS):
                chunk = np.asarray(images[start : start + _ROWS])  # (rows, H, W, C)
                yield chunk.transpose(0, 3, 1, 2)
