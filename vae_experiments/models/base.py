"""What every model shares: a decoder, a likelihood for its output, and a latent size."""

from __future__ import annotations

import torch
from torch import nn

from vae_experiments.models.likelihoods import Likelihood


def squared_error(x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Squared error per image, summed over pixels: (B, C, H, W) -> (B,)."""
    return (reconstruction - x).square().flatten(1).sum(1)


class LatentModel(nn.Module):
    """Base of all models: ``encode`` to a code, ``decode`` to an image, ``loss`` to named terms.

    Subclasses implement ``encode(x) -> (B, latent_dim)``, ``loss(x, step) -> dict`` and
    ``sample(n) -> (n, C, H, W)``.
    """

    #: Whether ``sample`` draws from a prior the model was trained with (VAE) rather than from a
    #: density fitted after training (AE).
    has_prior: bool = False

    def __init__(self, decoder: nn.Module, likelihood: Likelihood, latent_dim: int):
        super().__init__()
        self.decoder = decoder
        self.likelihood = likelihood
        self.latent_dim = latent_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, x: torch.Tensor, step: int | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent codes (B, latent_dim) -> reconstructed images (B, C, H, W) in data space."""
        return self.likelihood.mean(self.decoder(z))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction ``decode(encode(x))`` of images (B, C, H, W)."""
        return self.decode(self.encode(x))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
