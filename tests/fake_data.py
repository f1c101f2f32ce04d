"""Tiny seeded datasets written in the exact on-disk formats of the real ones."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CELEBA_SIZE = (178, 218)  # (W, H) of CelebA's aligned images


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array (N,) or (N, H, W) as IDX: magic 0x0801/0x0803, uint32 dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = (0x0800 + array.ndim).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """Write ``array`` as an IDX file at ``path`` (gzipped, with ".gz" appended, if ``gz``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(idx_bytes(array))
    else:
        path.write_bytes(idx_bytes(array))
    return path


def write_idx_dataset(
    root: Path,
    n_train: int = 64,
    n_test: int = 32,
    gz: bool = False,
    layout: str = "torchvision",
    name: str = "MNIST",
    seed: int = 0,
) -> Path:
    """Write the four MNIST-style IDX files with random 28x28 images and labels 0..9.

    Args:
        root: Becomes ``data.source.data_dir``.
        layout: "torchvision" writes into ``root/<name>/raw/``, "flat" into ``root`` (Debian).

    Returns:
        The folder holding the four files.
    """
    if layout not in ("torchvision", "flat"):
        raise ValueError(f"layout must be 'torchvision' or 'flat', got {layout!r}")
    folder = root / name / "raw" if layout == "torchvision" else root
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        write_idx(folder / IDX_NAMES[f"{split}_images"], rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(folder / IDX_NAMES[f"{split}_labels"], rng.integers(0, 10, n), gz)
    return folder


def photo_crops(n: int, size: tuple[int, int], seed: int = 0) -> list[Image.Image]:
    """Cut ``n`` RGB crops of ``size`` (W, H) at seeded positions from scikit-learn's two photos."""
    photos = load_sample_images().images  # two (427, 640, 3) uint8 photos
    rng = np.random.default_rng(seed)
    width, height = size
    crops = []
    for i in range(n):
        photo = photos[i % len(photos)]
        top = rng.integers(0, photo.shape[0] - height + 1)
        left = rng.integers(0, photo.shape[1] - width + 1)
        crops.append(Image.fromarray(photo[top : top + height, left : left + width]))
    return crops


def write_celeba(root: Path, n: int = 12, kaggle: bool = False, seed: int = 0) -> Path:
    """Write a tiny CelebA: 178x218 JPEGs and the partition file (~2/3 train, 1/6 val, 1/6 test).

    Args:
        root: Becomes ``data.source.data_dir``; files go to ``root/celeba/``.
        kaggle: Kaggle's layout (``img_align_celeba/img_align_celeba/`` and a ``.csv`` partition)
            instead of torchvision's (``img_align_celeba/`` and ``.txt``).

    Returns:
        The image folder.
    """
    celeba = root / "celeba"
    image_dir = celeba / "img_align_celeba"
    if kaggle:
        image_dir = image_dir / "img_align_celeba"
    image_dir.mkdir(parents=True, exist_ok=True)
    n_eval = max(1, n // 6)
    partitions = [0] * (n - 2 * n_eval) + [1] * n_eval + [2] * n_eval
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for name, crop in zip(names, photo_crops(n, CELEBA_SIZE, seed), strict=True):
        crop.save(image_dir / name, quality=90)
    if kaggle:
        lines = ["image_id,partition"] + [
            f"{a},{p}" for a, p in zip(names, partitions, strict=True)
        ]
        (celeba / "list_eval_partition.csv").write_text("\n".join(lines) + "\n")
    else:
        lines = [f"{a} {p}" for a, p in zip(names, partitions, strict=True)]
        (celeba / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return image_dir


def write_image_folder(
    root: Path,
    n: int = 12,
    classes: tuple[str, ...] = ("cats", "dogs"),
    size: tuple[int, int] = (40, 30),
    seed: int = 0,
) -> Path:
    """Write ``n`` photo crops of ``size`` (W, H) round-robin into ``root/<class>/``.

    Extensions cycle through .png, .jpg, .JPEG (case-insensitive matching); every third image of
    a class goes one folder deeper (``<class>/nested/``) to exercise the recursive search. With
    ``classes=()`` all images go directly into ``root``.

    Returns:
        ``root``, the folder to pass as ``data.source.path``.
    """
    extensions = (".png", ".jpg", ".JPEG")
    for i, crop in enumerate(photo_crops(n, size, seed)):
        folder = root
        if classes:
            folder = root / classes[i % len(classes)]
            if (i // len(classes)) % 3 == 2:
                folder = folder / "nested"
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"img{i:03d}{extensions[i % len(extensions)]}")
    return root
