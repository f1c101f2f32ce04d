"""Image grids for TensorBoard and PNG files (plain torch/torchvision)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from vae_experiments.runs.files import atomic_write


def image_grid(rows: list[torch.Tensor], min_side: int = 48) -> torch.Tensor:
    """Stacks equal-length image batches (B, C, H, W) as rows of one grid (3, H', W').

    Small images (digits are 8x8) are enlarged with nearest-neighbour scaling so that each is at
    least ``min_side`` pixels high and the grid is readable.
    """
    images = torch.cat(rows).detach().float().clamp(0, 1).cpu()
    scale = max(1, -(-min_side // images.shape[-2]))
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    return make_grid(images, nrow=rows[0].shape[0], padding=2, pad_value=1.0)


def save_grid(grid: torch.Tensor, path: str | Path) -> Path:
    """Writes a grid from :func:`image_grid` as PNG, creating the folder; atomically (a full
    disk raises :class:`~vae_experiments.runs.files.DiskFullError` and keeps the old file)."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        save_image(grid, f, format="png")
    return path
