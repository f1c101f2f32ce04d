"""Tables and pictures for comparing methods by test reconstruction error per latent size."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure

from vae_experiments.pictures import image_grid


@dataclass(frozen=True)
class Result:
    """Test squared error per image (pixels in [0, 1], summed over pixels) of one method at one
    latent size."""

    method: str
    latent_dim: int
    test_recon_mse: float


def write_csv(results: Sequence[Result], path: str | Path) -> Path:
    """``method,latent_dim,test_recon_mse``, one row per result."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "latent_dim", "test_recon_mse"])
        for r in results:
            writer.writerow([r.method, r.latent_dim, f"{r.test_recon_mse:.6g}"])
    return path


def markdown_table(results: Sequence[Result]) -> str:
    """Methods as rows, latent sizes as columns, best value per column in bold."""
    methods = list(dict.fromkeys(r.method for r in results))
    dims = sorted({r.latent_dim for r in results})
    value = {(r.method, r.latent_dim): r.test_recon_mse for r in results}
    best = {d: min(v for (m, k), v in value.items() if k == d) for d in dims}
    lines = [
        "Test squared error per image (pixels in [0, 1], summed over pixels; lower is better)",
        "",
        "| method | " + " | ".join(f"k={d}" for d in dims) + " |",
        "| --- |" + " ---: |" * len(dims),
    ]
    for method in methods:
        cells = []
        for d in dims:
            v = value.get((method, d))
            text = "" if v is None else f"{v:.3f}"
            cells.append(f"**{text}**" if v is not None and v == best[d] else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_error_vs_latent_dim(results: Sequence[Result], title: str = "") -> Figure:
    """One line per method: test squared error against latent size (log-scaled x)."""
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = figure.subplots()
    for method in dict.fromkeys(r.method for r in results):
        points = sorted((r.latent_dim, r.test_recon_mse) for r in results if r.method == method)
        xs, ys = zip(*points, strict=True)
        style = "--" if method == "pca" else "-"
        ax.plot(xs, ys, style, marker="o", label=method)
    dims = sorted({r.latent_dim for r in results})
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(d) for d in dims])
    ax.set_xlabel("latent size k")
    ax.set_ylabel("test squared error per image")
    ax.set_title(title or "Reconstruction error against latent size")
    ax.grid(alpha=0.3)
    ax.legend()
    return figure


def plot_reconstructions(
    originals: torch.Tensor, reconstructions: Mapping[tuple[str, int], torch.Tensor]
) -> Figure:
    """Rows: the originals, then each method; columns: latent sizes.

    Args:
        originals: test images (n, C, H, W).
        reconstructions: (method, latent_dim) -> reconstructions (n, C, H, W).
    """
    methods = list(dict.fromkeys(m for m, _ in reconstructions))
    dims = sorted({k for _, k in reconstructions})
    strip = image_grid([originals], min_side=32)  # (3, h, w)
    height, width = strip.shape[1], strip.shape[2]
    rows = ["original", *methods]
    figure = Figure(
        figsize=(max(4.0, 0.012 * width * len(dims)), 0.012 * height * len(rows) + 0.6),
        layout="constrained",
    )
    axes = figure.subplots(len(rows), len(dims), squeeze=False)
    for col, k in enumerate(dims):
        for row, name in enumerate(rows):
            images = originals if name == "original" else reconstructions.get((name, k))
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if images is not None:
                ax.imshow(image_grid([images], min_side=32).permute(1, 2, 0).numpy())
            if col == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center")
            if row == 0:
                ax.set_title(f"k={k}")
    return figure
