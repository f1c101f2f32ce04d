"""Image grids for TensorBoard and PNG files (plain torch/torchvision)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import ImageDraw, ImageFont
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import make_grid, save_image

from vae_experiments.runs.files import atomic_write

#: Pixels between the images of a grid.
PADDING = 2


def image_grid(
    rows: list[torch.Tensor], min_side: int = 48, row_labels: Sequence[str] | None = None
) -> torch.Tensor:
    """Stacks equal-length image batches (B, C, H, W) as rows of one grid (3, H', W').

    Small images (digits are 8x8) are enlarged with nearest-neighbour scaling so that each is at
    least ``min_side`` pixels high and the grid is readable. ``row_labels`` (one per row, ``""``
    for none) are written in black in a white margin on the left: what each row is
    (``input``, ``reconstruction``, ``sample``), or a traversal's dimension and range.
    """
    images = torch.cat(rows).detach().float().clamp(0, 1).cpu()
    scale = max(1, -(-min_side // images.shape[-2]))
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    grid = make_grid(images, nrow=rows[0].shape[0], padding=PADDING, pad_value=1.0)
    if row_labels is None:
        return grid
    if len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    return _label_rows(grid, row_labels, row_height=images.shape[-2] + PADDING)


#: Height of row labels in pixels, at most (smaller for rows lower than 3.5 times it).
LABEL_SIZE = 14


def label_font(row_height: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's own font (no font file needed) at a size that suits rows of ``row_height``
    pixels: at its default 10 px, spaces shrink to a pixel ("to0.74")."""
    size = max(10, min(LABEL_SIZE, row_height * 2 // 7))
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1, with FreeType
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _label_rows(grid: torch.Tensor, labels: Sequence[str], row_height: int) -> torch.Tensor:
    """``grid`` (3, H, W) with a white left margin holding one label per row of images (an
    empty label leaves its row's margin blank)."""
    font = label_font(row_height)
    boxes = [font.getbbox(label) if label else (0, 0, 0, 0) for label in labels]
    margin = 3 * PADDING + math.ceil(max(box[2] for box in boxes))
    canvas = torch.ones(3, grid.shape[1], grid.shape[2] + margin)
    canvas[:, :, margin:] = grid
    picture = to_pil_image(canvas)
    draw = ImageDraw.Draw(picture)
    for row, (label, box) in enumerate(zip(labels, boxes, strict=True)):
        middle = PADDING + row * row_height + (row_height - PADDING) / 2
        draw.text((PADDING, middle - (box[1] + box[3]) / 2), label, fill=(0, 0, 0), font=font)
    return pil_to_tensor(picture).float() / 255


def save_grid(grid: torch.Tensor, path: str | Path) -> Path:
    """Writes a grid from :func:`image_grid` as PNG, creating the folder; atomically (a full
    disk raises :class:`~vae_experiments.runs.files.DiskFullError` and keeps the old file)."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        save_image(grid, f, format="png")
    return path
