"""Input corruptions for denoising autoencoders (applied to the input only, in training only)."""

from __future__ import annotations

import torch
from torch import nn

from vae_experiments.targets import ConfigError


class GaussianNoise(nn.Module):
    """Adds N(0, std^2) noise to every pixel (Vincent et al. 2010's additive isotropic noise)."""

    def __init__(self, std: float):
        super().__init__()
        if std < 0:
            raise ConfigError("std", std, "must be a number >= 0")
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.std * torch.randn_like(x)


class Masking(nn.Module):
    """Sets each pixel to 0 independently with probability ``p`` (masking noise)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ConfigError("p", p, "must be a number in [0, 1)")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.rand_like(x) >= self.p
        return x * keep
