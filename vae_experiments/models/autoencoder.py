"""Deterministic autoencoders: linear, deep (MLP or conv) and denoising are configs of one class."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vae_experiments.models.base import LatentModel, squared_error
from vae_experiments.models.likelihoods import Likelihood
from vae_experiments.models.networks import Network


class Autoencoder(LatentModel):
    """x -> encoder -> z -> decoder -> reconstruction, trained to minimise a reconstruction loss.

    With a linear encoder and decoder and the squared-error loss, the optimum spans the principal
    subspace of the data (Baldi & Hornik 1989). With a ``corruption``, it is a denoising
    autoencoder (Vincent et al. 2008, https://doi.org/10.1145/1390156.1390294): the corruption is
    applied to the input in training mode only, and the loss is always against the clean input.

    Args:
        image_shape: (C, H, W) of the data; the trainer passes the data module's.
        latent_dim: size of the code.
        network: builds the encoder, images (B, C, H, W) -> codes (B, latent_dim), and the
            decoder, codes (B, latent_dim) -> decoder output (B, C, H, W).
        likelihood: turns the decoder output into a loss and a reconstruction (``SquaredError``
            for the classic AE, ``Bernoulli`` for cross-entropy).
        corruption: optional module applied to the input during training.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        latent_dim: int,
        network: Network,
        likelihood: Likelihood,
        corruption: nn.Module | None = None,
    ):
        super().__init__(image_shape, latent_dim, network, likelihood, latent_dim)
        self.corruption = corruption
        # A diagonal Gaussian over codes for ``sample``; standard normal until fitted to data.
        self.register_buffer("latent_loc", torch.zeros(latent_dim))
        self.register_buffer("latent_scale", torch.ones(latent_dim))

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Codes (B, latent_dim) of images x (B, C, H, W); the labels y are not used."""
        return self.encoder(x)

    def loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        step: int | None = None,
        monitor: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Loss terms for a batch x (B, C, H, W), each summed over pixels and averaged over B.

        Returns ``loss`` (= ``recon``), ``recon`` (minus the likelihood's log-probability: the
        squared error for ``SquaredError``) and ``recon_mse`` (squared error in data space).
        ``monitor=False`` leaves ``recon_mse`` out. The labels ``y`` and ``step`` are unused;
        they keep the signature common to all models.
        """
        inputs = self.corruption(x) if self.training and self.corruption is not None else x
        output = self.decoder(self.encoder(inputs))
        recon = -self.likelihood.log_prob(x, output).mean()
        if not monitor:
            return {"loss": recon, "recon": recon}
        recon_mse = squared_error(x, self.likelihood.mean(output).detach()).mean()
        return {"loss": recon, "recon": recon, "recon_mse": recon_mse}

    @torch.no_grad()
    def fit_latent_gaussian(self, codes: torch.Tensor) -> None:
        """Sets the diagonal Gaussian that ``sample`` draws from to the codes' mean and std."""
        self.latent_loc.copy_(codes.mean(0))
        self.latent_scale.copy_(codes.std(0))

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decodes n codes drawn from the stored diagonal Gaussian (see ``fit_latent_gaussian``);
        ``y`` is not used."""
        eps = torch.randn(n, self.latent_dim, device=self.latent_loc.device, generator=generator)
        return self.decode(self.latent_loc + self.latent_scale * eps)
