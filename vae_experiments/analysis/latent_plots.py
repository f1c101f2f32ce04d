"""Pictures of latent codes: a scatter of codes coloured by label (matplotlib, no pyplot)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import Tensor

MAX_LEGEND_CLASSES = 20  # more distinct labels than this get a colourbar instead of a legend


def project_2d(codes: Tensor) -> tuple[Tensor, tuple[str, str], str]:
    """Codes (N, D) as points (N, 2) with axis labels and a description of the projection.

    2-D codes are returned as they are; wider codes are projected on their first two principal
    components (SVD of the centred codes; the axis labels give each one's share of the variance).
    1-D codes get a second coordinate of zero.
    """
    codes = codes.detach().double().cpu()
    if codes.ndim != 2 or codes.shape[0] < 1:
        raise ValueError(f"codes must have shape (N, latent_dim), got {tuple(codes.shape)}")
    dim = codes.shape[1]
    if dim == 2:
        return codes, ("z1", "z2"), "the 2-D latent codes"
    if dim == 1:
        return torch.cat([codes, torch.zeros_like(codes)], 1), ("z1", ""), "the 1-D latent codes"
    centred = codes - codes.mean(0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    share = singular.square() / singular.square().sum().clamp_min(1e-300)
    points = centred @ vh[:2].T  # (N, 2)
    labels = (f"PC1 ({share[0]:.0%} of variance)", f"PC2 ({share[1]:.0%} of variance)")
    return points, labels, f"PCA projection of the {dim}-D latent codes"


def latent_scatter(
    codes: Tensor,
    labels: Tensor | None,
    path: str | Path,
    title: str | None = None,
    seed: int = 0,
    label_name: str = "label",
) -> Path:
    """Writes a PNG scatter of codes (N, D) coloured by label: 2-D codes directly, wider codes as
    their 2-D PCA projection (the title says which).

    Args:
        codes: (N, D) codes, e.g. of the test split.
        labels: (N,) integer labels or None. Up to 20 distinct labels get a legend, more a
            colourbar.
        path: the PNG to write (folders are created).
        title: first title line (the projection is named on the second).
        seed: order in which points are drawn (shuffled, so no class hides the others).
        label_name: what the labels are, for the legend or colourbar (a factor's name).
    """
    points, (xlabel, ylabel), description = project_2d(codes)
    n = points.shape[0]
    points = points.numpy()
    order = np.random.default_rng(seed).permutation(n)
    # Point size and opacity that keep 10,000 points readable and a few hundred visible.
    size = float(np.clip(3000 / n, 3, 30))
    alpha = float(np.clip(300 / n**0.5 * 0.2, 0.35, 0.9))

    figure = Figure(figsize=(7.5, 6.5), dpi=120, layout="constrained")
    ax = figure.add_subplot()
    if labels is None:
        ax.scatter(*points[order].T, s=size, alpha=alpha, linewidths=0, color="tab:blue")
    else:
        label_values = torch.as_tensor(labels).detach().cpu().numpy().reshape(-1)
        if label_values.shape[0] != n:
            raise ValueError(f"got {label_values.shape[0]} labels for {n} codes")
        classes = np.unique(label_values)
        if len(classes) <= MAX_LEGEND_CLASSES:
            palette = colormaps["tab10" if len(classes) <= 10 else "tab20"]
            index = np.searchsorted(classes, label_values)
            colors = palette(index % palette.N)
            ax.scatter(*points[order].T, s=size, alpha=alpha, linewidths=0, c=colors[order])
            handles = [
                Line2D([], [], marker="o", linestyle="", color=palette(i % palette.N), label=str(c))
                for i, c in enumerate(classes)
            ]
            ax.legend(
                handles=handles,
                title=label_name,
                loc="center left",
                bbox_to_anchor=(1.01, 0.5),
                frameon=False,
                markerscale=1.5,
            )
        else:
            mappable = ax.scatter(
                *points[order].T,
                s=size,
                alpha=alpha,
                linewidths=0,
                c=label_values[order],
                cmap="viridis",
            )
            figure.colorbar(mappable, ax=ax, label=label_name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if codes.shape[1] == 1:
        ax.set_yticks([])
    ax.grid(alpha=0.3)
    heading = title or "Latent codes"
    ax.set_title(f"{heading}\n{description}, {n} points")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
