"""A split of image files decoded once into a memory-mapped uint8 array on disk.

The cache of a split is ``<cache_dir>/<name>-<key>.npy``, an array (N, C, H, W) that
``np.load(mmap_mode="c")`` maps without reading it, beside ``<name>-<key>.json``. The key hashes
what decides the pixels: the transform (crop and size), the channels, the alpha background, the
minimum size and the list of files. The
JSON holds a fingerprint of the files (path, size and modification time of each) and is written
last, so it marks a complete build: a cache counts only when its JSON exists and its fingerprint
matches the files now. A build writes into a temporary file in the same folder, syncs it to
disk and renames it into place, so an interrupted build never leaves a cache that looks valid.
One process builds a cache at a time (a lock file beside it); the others wait and then use it.

Images that are generated or read from one file (the rendered shapes, a dSprites ``.npz``) are
cached the same way by :func:`ensure_array`, keyed by a description of what made them.

Where caches live: a file source's ``cache_dir``, else :func:`default_cache_dir`; other caches
of a dataset (the sample-quality classifier of :mod:`vae_experiments.analysis.classifier`) go
in the same folder, :func:`cache_dir_of`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vae_experiments.data.errors import DataError
from vae_experiments.data.files import CorruptImageError, ImageFiles
from vae_experiments.data.parallel import map_chunks

try:
    import fcntl
except ImportError:  # Windows: no locking; concurrent builds stay correct, only wasteful
    fcntl = None

log = logging.getLogger(__name__)

# 2: 16-bit images scaled and alpha composited (version 1 clipped them and dropped alpha).
CACHE_VERSION = 2
_COPY_CHUNK = 4096
# What _decode_into found about an image, besides decoding it.
_CORRUPT, _SMALL, _UNDERSIZED = "corrupt", "small", "undersized"


def default_cache_dir() -> Path:
    """``$VAE_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/vae-experiments``, else
    ``~/.cache/vae-experiments`` (``~`` expanded).

    The same rule as the ``cache_dir`` default of ``configs/data/celeba.yaml`` and
    ``image_folder.yaml`` (spelled there with ``oc.env``; a test keeps the two in step).
    """
    if os.environ.get("VAE_CACHE_DIR"):
        return Path(os.environ["VAE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "vae-experiments"


def cache_dir_of(source: object) -> Path:
    """The folder of a data source's caches: its ``cache_dir`` (file sources) or else
    :func:`default_cache_dir` (sources with nothing to decode: digits, MNIST, synthetic)."""
    folder = getattr(source, "cache_dir", None)
    return Path(folder).expanduser() if folder is not None else default_cache_dir()


class UnwritableCacheError(DataError, PermissionError):
    """The folder of the decoded caches cannot be written; the message says what to set."""


@dataclass(frozen=True)
class DecodedImages:
    """A split read from its cache.

    Attributes:
        images: uint8 (N_kept, C, H, W), memory-mapped copy-on-write (reads share the page cache).
        kept: positions in the source file list of the N_kept images, in order.
        skipped: files left out as unreadable when the cache was built (``skip_corrupt``).
        small: files left out as smaller than ``min_size`` (shorter side).
        undersized: how many of the kept images have a shorter side below the output size (and
            were upscaled).
        path: the ``.npy`` file.
    """

    images: Tensor
    kept: list[int]
    skipped: list[Path]
    small: list[Path]
    undersized: int
    path: Path


def cache_file(cache_dir: Path, name: str, files: ImageFiles, min_size: int) -> Path:
    """The ``.npy`` path of ``files`` decoded: ``<cache_dir>/<name>-<key>.npy``.

    Args:
        cache_dir: Folder of caches.
        name: Readable prefix, e.g. ``celeba-train-crop148-64px``.
        files: The split; its transform, channels, alpha background and paths make the key.
        min_size: Images with a shorter side below this are left out; part of the key.
    """
    description = {
        "version": CACHE_VERSION,
        "transform": repr(files.transform),
        "channels": files.channels,
        "alpha_background": files.alpha_background,
        "min_size": min_size,
        "paths": [str(p) for p in files.paths],
    }
    key = hashlib.sha256(json.dumps(description).encode()).hexdigest()[:16]
    return cache_dir / f"{name}-{key}.npy"


def source_fingerprint(paths: Sequence[Path]) -> str:
    """Hash of every file's path, size and modification time: changes when any file does.

    Raises:
        FileNotFoundError: A file is gone (names it).
    """
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _meta_file(npy: Path) -> Path:
    return npy.with_suffix(".json")


def load_cache(
    npy: Path, fingerprint: str, num_files: int, quiet: bool = False
) -> DecodedImages | None:
    """Map the cache at ``npy`` if it is complete and was built from the files as they are now.

    Args:
        quiet: Do not log why a cache is not used.

    Returns:
        The decoded images, or None if the cache is missing, incomplete or stale.
    """
    try:
        meta = json.loads(_meta_file(npy).read_text())
        if meta["version"] != CACHE_VERSION or meta["num_files"] != num_files:
            return None
        if meta["fingerprint"] != fingerprint:
            if not quiet:
                log.info("the images changed since %s was built; rebuilding it", npy)
            return None
        # "c": copy-on-write, so torch gets a writable array without a copy in memory.
        array = np.load(npy, mmap_mode="c")
        skipped = [Path(p) for p in meta["skipped"]]
        small = [Path(p) for p in meta["small"]]
        left_out = set(meta["skipped_positions"]) | set(meta["small_positions"])
        undersized = int(meta["undersized"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if _meta_file(npy).exists() and not quiet:
            log.warning("ignoring unreadable cache %s (%s); rebuilding it", npy, exc)
        return None
    kept = [i for i in range(num_files) if i not in left_out]
    if array.dtype != np.uint8 or list(array.shape) != meta["shape"] or len(kept) != len(array):
        if not quiet:
            log.warning("ignoring cache %s: its array does not match %s", npy, _meta_file(npy))
        return None
    return DecodedImages(torch.from_numpy(array), kept, skipped, small, undersized, npy)


def ensure_cache(
    files: ImageFiles,
    npy: Path,
    image_shape: tuple[int, int, int],
    skip_corrupt: bool,
    threads: int,
    min_size: int,
) -> DecodedImages:
    """Return the cache of ``files`` at ``npy``, building it first if missing or stale.

    Args:
        files: The split's files, labels and transform (decoded with ``files.decode``).
        npy: Where the cache goes (see :func:`cache_file`).
        image_shape: (C, H, W) every decoded image must have.
        skip_corrupt: Leave unreadable files out (recorded in the cache) instead of raising.
        threads: Decoding threads (PIL releases the GIL while decoding and resizing).
        min_size: Leave out (recorded in the cache) images whose shorter side is below this.

    Raises:
        CorruptImageError: A file cannot be decoded and ``skip_corrupt`` is false; nothing is
            left behind.
        UnwritableCacheError: ``npy``'s folder cannot be written (the message says what to
            set; a PermissionError).
    """
    fingerprint = source_fingerprint(files.paths)
    cached = load_cache(npy, fingerprint, len(files))
    if cached is not None:
        log.info("using the decoded images in %s", npy)
        return cached
    _make_folder(npy.parent)
    with _build_lock(npy):
        # Another process may have built it while this one waited for the lock.
        cached = load_cache(npy, fingerprint, len(files), quiet=True)
        if cached is None:
            build_cache(files, npy, fingerprint, image_shape, skip_corrupt, threads, min_size)
            cached = load_cache(npy, fingerprint, len(files))
    if cached is None:
        raise RuntimeError(f"{npy} was just built but cannot be read back")
    return cached


def build_cache(
    files: ImageFiles,
    npy: Path,
    fingerprint: str,
    image_shape: tuple[int, int, int],
    skip_corrupt: bool,
    threads: int,
    min_size: int,
) -> None:
    """Decode every file into ``npy`` and write its JSON; see :func:`ensure_cache`."""
    for stale in npy.parent.glob(f"{npy.name}.tmp*"):  # left by a killed build (we hold the lock)
        stale.unlink(missing_ok=True)
    tmp = npy.with_name(f"{npy.name}.tmp{os.getpid()}")
    compact = npy.with_name(f"{npy.name}.tmp{os.getpid()}c")
    start = time.perf_counter()
    log.info("decoding %d images into %s (%d threads)", len(files), npy, threads)
    try:
        decoded = _decode_into(files, tmp, image_shape, skip_corrupt, threads, min_size, npy.name)
        skipped = [i for i, status in decoded if status == _CORRUPT]
        small = [i for i, status in decoded if status == _SMALL]
        undersized = sum(status == _UNDERSIZED for _, status in decoded)
        if skipped or small:
            left_out = set(skipped) | set(small)
            _copy_rows(tmp, compact, [i for i in range(len(files)) if i not in left_out])
            tmp.unlink()
            tmp = compact
        _fsync(tmp)
        meta = {
            "version": CACHE_VERSION,
            "fingerprint": fingerprint,
            "num_files": len(files),
            "shape": [len(files) - len(skipped) - len(small), *image_shape],
            "skipped_positions": skipped,
            "skipped": [str(files.paths[i]) for i in skipped],
            "small_positions": small,
            "small": [str(files.paths[i]) for i in small],
            "undersized": undersized,
            "transform": repr(files.transform),
            "channels": files.channels,
            "alpha_background": files.alpha_background,
            "min_size": min_size,
        }
        _publish(tmp, npy, meta)
    finally:
        tmp.unlink(missing_ok=True)
        compact.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    log.info(
        "decoded %d images in %.1f s (%.0f images/s) into %s",
        len(files),
        seconds,
        len(files) / max(seconds, 1e-9),
        npy,
    )


def _publish(tmp: Path, npy: Path, meta: dict[str, Any]) -> None:
    """Puts the finished, synced array ``tmp`` in place at ``npy`` and writes its JSON last."""
    # The JSON marks a complete cache: drop the old one before the array changes.
    _meta_file(npy).unlink(missing_ok=True)
    os.replace(tmp, npy)
    _write_atomic(_meta_file(npy), json.dumps(meta, indent=1))
    _fsync_folder(npy.parent)


def _decode_into(
    files: ImageFiles,
    tmp: Path,
    image_shape: tuple[int, int, int],
    skip_corrupt: bool,
    threads: int,
    min_size: int,
    desc: str,
) -> list[tuple[int, str]]:
    """Decode image i into row i of a new array at ``tmp``; return (position, status) of the
    images that are not plain: corrupt (skipped), small (left out) or undersized (kept)."""
    shape = (len(files), *image_shape)
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    expected = (*image_shape[1:], image_shape[0])  # (H, W, C) from PIL
    output_side = min(image_shape[1:])

    def decode(start: int, stop: int) -> list[tuple[int, str]]:
        found = []
        for i in range(start, stop):
            try:
                image, size = files.decode(i)
            except CorruptImageError:
                if not skip_corrupt:
                    raise
                found.append((i, _CORRUPT))
                continue
            if min(size) < min_size:
                found.append((i, _SMALL))
                continue
            if min(size) < output_side:
                found.append((i, _UNDERSIZED))
            if image.shape != expected:
                raise RuntimeError(f"{files.paths[i]} decoded to {image.shape}, not {expected}")
            out[i] = image.transpose(2, 0, 1)
        return found

    found = map_chunks(decode, len(files), threads, f"caching {desc}")
    out.flush()  # the mapping closes when ``out`` goes out of scope
    return found


def ensure_array(
    npy: Path,
    meta: dict[str, Any],
    shape: tuple[int, ...],
    fill: Callable[[np.ndarray], None],
    instead: str,
) -> Tensor:
    """The uint8 array ``shape`` cached at ``npy`` (memory-mapped copy-on-write), made by
    ``fill(out)`` first when it is missing or was made from something else: for images that are
    generated or read from one file rather than decoded from image files (the rendered shapes,
    a dSprites ``.npz``).

    The cache counts when its JSON holds ``meta`` (what decides the pixels: a renderer's
    version and grid, a file's fingerprint and the rows kept), as :func:`ensure_cache`'s do;
    built the same way (a temporary file synced and renamed, the JSON last, under a lock).

    Args:
        npy: Where the array goes.
        meta: JSON-able description of the contents; a cache with another is rebuilt.
        shape: The array's shape, e.g. (N, C, H, W).
        fill: Writes every element of the (uninitialised) array it is given.
        instead: What ``data.source.cache=false`` does, for the error of an unwritable folder.

    Raises:
        UnwritableCacheError: ``npy``'s folder cannot be written.
    """
    expected = {"version": CACHE_VERSION, "shape": list(shape), **meta}
    cached = _load_array(npy, expected)
    if cached is not None:
        log.info("using the cached images in %s", npy)
        return cached
    _make_folder(npy.parent, instead)
    with _build_lock(npy):
        # Another process may have built it while this one waited for the lock.
        cached = _load_array(npy, expected)
        if cached is None:
            _build_array(npy, expected, shape, fill)
            cached = _load_array(npy, expected)
    if cached is None:
        raise RuntimeError(f"{npy} was just built but cannot be read back")
    return cached


def _load_array(npy: Path, expected: dict[str, Any]) -> Tensor | None:
    """The array at ``npy`` if its JSON says ``expected`` and the array has its shape."""
    try:
        if json.loads(_meta_file(npy).read_text()) != expected:
            return None
        array = np.load(npy, mmap_mode="c")
    except (OSError, ValueError) as exc:
        if _meta_file(npy).exists():
            log.warning("ignoring unreadable cache %s (%s); rebuilding it", npy, exc)
        return None
    if array.dtype != np.uint8 or list(array.shape) != expected["shape"]:
        log.warning("ignoring cache %s: its array does not match %s", npy, _meta_file(npy))
        return None
    return torch.from_numpy(array)


def _build_array(
    npy: Path, meta: dict[str, Any], shape: tuple[int, ...], fill: Callable[[np.ndarray], None]
) -> None:
    """Make the array of :func:`ensure_array` and its JSON (we hold the lock)."""
    for stale in npy.parent.glob(f"{npy.name}.tmp*"):  # left by a killed build
        stale.unlink(missing_ok=True)
    tmp = npy.with_name(f"{npy.name}.tmp{os.getpid()}")
    start = time.perf_counter()
    log.info("caching %s images into %s", "x".join(map(str, shape)), npy)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        fill(out)
        out.flush()
        del out
        _fsync(tmp)
        _publish(tmp, npy, meta)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("cached %d images in %.1f s into %s", shape[0], time.perf_counter() - start, npy)


def _copy_rows(source: Path, target: Path, rows: list[int]) -> None:
    """Write the given rows of the array at ``source`` as a new array at ``target``."""
    array = np.load(source, mmap_mode="r")
    out = np.lib.format.open_memmap(
        target, mode="w+", dtype=np.uint8, shape=(len(rows), *array.shape[1:])
    )
    for start in range(0, len(rows), _COPY_CHUNK):
        out[start : start + _COPY_CHUNK] = array[rows[start : start + _COPY_CHUNK]]
    out.flush()
    del out, array


def _make_folder(folder: Path, instead: str = "to decode the files every epoch instead") -> None:
    """Create the cache folder, or raise :class:`UnwritableCacheError` saying what to set
    (``data.source.cache=false`` and what it does ``instead``)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"{folder} is not writable")
    except OSError as exc:
        raise UnwritableCacheError(
            f"cannot write the decoded-image cache in {folder} ({exc}). Set "
            f"data.source.cache_dir to a writable folder, or data.source.cache=false {instead}."
        ) from exc


@contextlib.contextmanager
def _build_lock(npy: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<npy>.lock`` (released when the process dies, too)."""
    with open(npy.with_name(f"{npy.name}.lock"), "a") as lock:
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process to finish building %s", npy)
                fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_folder(folder: Path) -> None:
    # Makes the renames durable; not every platform can open a folder.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
