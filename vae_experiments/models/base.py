"""What every model shares: an encoder and a decoder built by a network body for the data's image
shape, a likelihood for the decoder's output, and a latent size."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vae_experiments.models.likelihoods import Likelihood
from vae_experiments.models.networks import Network
from vae_experiments.targets import ConfigError


def squared_error(x: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Squared error per image, summed over pixels: (B, C, H, W) -> (B,)."""
    return (reconstruction - x).square().flatten(1).sum(1)


class LatentModel(nn.Module):
    """Base of all models: ``encode`` to a code, ``decode`` to an image, ``loss`` to named terms.

    Subclasses implement ``encode(x) -> (B, latent_dim)``, ``loss(x, step) -> dict`` and
    ``sample(n) -> (n, C, H, W)``.

    Args:
        image_shape: (C, H, W) of the data; the trainer passes the data module's.
        latent_dim: size of the latent code.
        network: the body that builds ``encoder`` and ``decoder`` for ``image_shape``.
        likelihood: p(x | z) given the decoder output.
        code_features: the encoder's output size (``latent_dim``, or more where the code holds
            more than a point, e.g. a posterior's mean and log-variance).
    """

    #: Whether ``sample`` draws from a prior the model was trained with (VAE) rather than from a
    #: density fitted after training (AE).
    has_prior: bool = False

    def __init__(
        self,
        image_shape: Sequence[int],
        latent_dim: int,
        network: Network,
        likelihood: Likelihood,
        code_features: int,
    ):
        super().__init__()
        if latent_dim < 1:
            raise ConfigError("latent_dim", latent_dim, "must be an integer >= 1")
        try:  # the encoder first: the same random initial weights as ever for a given seed
            encoder = network.encoder(image_shape, code_features)
            decoder = network.decoder(image_shape, latent_dim)
        except ConfigError as error:
            # ``image_shape`` is the model's own argument; anything else is about the network.
            raise error if error.key == "image_shape" else error.under("network") from None
        self.image_shape = tuple(int(s) for s in image_shape)
        # Registration order (decoder, likelihood, encoder) fixes the parameters' order, which
        # optimizer states in checkpoints depend on.
        self.decoder = decoder
        self.likelihood = likelihood
        self.latent_dim = latent_dim
        self.encoder = encoder

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
