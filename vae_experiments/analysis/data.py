"""A run's data outside the trainer: float batches of any split (see ``runs.load_data``)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from vae_experiments.data import ImageDataModule, ShuffledBatchSampler


def iterate_split(
    datamodule: ImageDataModule,
    split: str,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every image of a split, in order, as float batches (B, C, H, W) in [0, 1] and labels (B,).

    Binarised splits come out as stored (val/test are binarised once with a fixed seed, so an
    evaluation sees the same data every time).
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    dataset = datamodule.splits[split]
    sampler = ShuffledBatchSampler(
        len(dataset),
        batch_size or datamodule.batch_size,
        shuffle=False,
        drop_last=False,
        seed=0,
        rank=0,
        world_size=1,
    )
    loader = DataLoader(
        dataset, sampler=sampler, batch_size=None, num_workers=datamodule.num_workers
    )
    for images, labels in loader:
        yield datamodule.to_float(images.to(device, non_blocking=True)), labels.to(device)


def load_split(
    datamodule: ImageDataModule,
    split: str,
    device: str | torch.device = "cpu",
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split (or its first ``limit`` images) as one float tensor and its labels."""
    images, labels, count = [], [], 0
    for x, y in iterate_split(datamodule, split, device=device):
        images.append(x)
        labels.append(y)
        count += len(x)
        if limit is not None and count >= limit:
            break
    x, y = torch.cat(images), torch.cat(labels)
    return (x, y) if limit is None else (x[:limit], y[:limit])
