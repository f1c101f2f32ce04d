"""Deterministic split carving, driven by ``split_seed``."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vae_experiments.data.batches import TensorImages
from vae_experiments.targets import ConfigError


def resolve_split_size(size: int | float, available: int) -> int:
    """Turn a split size (count, or fraction of ``available``) into a number of images."""
    if isinstance(size, float):
        # A fraction asks for a non-empty split, so round up tiny ones instead of returning 0.
        return max(1, round(size * available))
    return size


def carve_splits(
    num_items: int, sizes: Mapping[str, int | float], split_seed: int
) -> dict[str, Tensor]:
    """Carve named splits off a seeded permutation of ``range(num_items)``; the rest is "train".

    Splits are carved in the order of ``sizes``; a float size is a fraction of the images left
    after the earlier splits (so digits' ``val_size`` is a fraction of the non-test images).

    Args:
        num_items: Number of images to split.
        sizes: Split name -> size, e.g. ``{"test": 0.2, "val": 0.1}``. Errors name the key
            ``data.source.<name>_size``.
        split_seed: Seed of the permutation, independent of the run seed.

    Returns:
        Split name -> sorted 1-D int64 indices, including "train"; together they cover every
        index exactly once.
    """
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(split_seed))
    splits: dict[str, Tensor] = {}
    start = 0
    for name, size in sizes.items():
        remaining = num_items - start
        count = resolve_split_size(size, remaining)
        if count >= remaining:
            raise ConfigError(
                allowed=f"data.source.{name}_size={size} takes {count} of the {remaining} remaining "
                f"images and leaves none for training; lower data.source.{name}_size"
            )
        # Sorted so each split keeps the source order (stable, readable evaluation batches).
        splits[name] = perm[start : start + count].sort().values
        start += count
    splits["train"] = perm[start:].sort().values
    return splits


def carve(
    images: Tensor, labels: Tensor, sizes: dict[str, int | float], split_seed: int
) -> dict[str, Dataset]:
    """In-memory splits carved from ``images`` (N, C, H, W) and ``labels`` (N,); see
    :func:`~vae_experiments.data.splits.carve_splits`."""
    indices = carve_splits(len(images), sizes, split_seed)
    return {name: TensorImages(images[idx], labels[idx]) for name, idx in indices.items()}
