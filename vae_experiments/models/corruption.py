"""Input corruptions for denoising autoencoders (applied to the input only, in training only)."""

from __future__ import annotations

import torch
from torch import nn


class GaussianNoise(nn.Module):
    """Adds N(0, std^2) noise to every pixel (Vincent et al. 2010's additive isotropic noise)."""

    def __init__(self, std: float):
        super().__init__()
        if std < 0:
            raise ValueError(f"model.noise.std must be >= 0, got {std}")
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.std * torch.randn_like(x)


class Masking(nn.Module):
    """Sets each pixel to 0 independently with probability ``p`` (masking noise)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"model.noise.p must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.rand_like(x) >= self.p
        return x * keep


NOISE_KINDS = ("gaussian", "mask")


def build_corruption(kind: str, std: float | None = None, p: float | None = None) -> nn.Module:
    """Maps ``model.noise`` ({kind, std, p}) to a corruption module."""
    if kind == "gaussian":
        if std is None:
            raise ValueError("model.noise.kind=gaussian needs model.noise.std")
        return GaussianNoise(std)
    if kind == "mask":
        if p is None:
            raise ValueError("model.noise.kind=mask needs model.noise.p")
        return Masking(p)
    raise ValueError(f"unknown model.noise.kind={kind!r}; choose one of {', '.join(NOISE_KINDS)}")
