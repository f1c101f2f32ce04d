"""Variational autoencoder with a diagonal Gaussian posterior and a standard normal prior."""

from __future__ import annotations

import torch
from torch import nn

from vae_experiments.models.base import LatentModel, squared_error
from vae_experiments.models.likelihoods import Likelihood


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per row, summed over latent dims: (B, D) -> (B,)."""
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(1)


class VAE(LatentModel):
    """VAE trained on the (beta-weighted) negative ELBO (Kingma & Welling 2013,
    https://arxiv.org/abs/1312.6114; beta: Higgins et al. 2017).

    The encoder outputs 2 * latent_dim features, read as the posterior mean and log-variance;
    z is drawn with the reparameterisation trick and the KL to the prior is analytic.

    Args:
        encoder: images (B, C, H, W) -> (B, 2 * latent_dim).
        decoder: latents (B, latent_dim) -> decoder output (B, C, H, W).
        likelihood: p(x | z) given the decoder output.
        latent_dim: size of z.
        beta: weight of the KL term in the training loss (1 gives the ELBO).
        kl_warmup_steps: the KL weight rises linearly from beta / kl_warmup_steps to beta over
            this many optimiser steps (0 for no warm-up; Bowman et al. 2016).
    """

    has_prior = True

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        likelihood: Likelihood,
        latent_dim: int,
        beta: float,
        kl_warmup_steps: int,
    ):
        super().__init__(decoder, likelihood, latent_dim)
        if beta < 0:
            raise ValueError(f"model.beta must be >= 0, got {beta}")
        if kl_warmup_steps < 0:
            raise ValueError(f"model.kl_warmup_steps must be >= 0, got {kl_warmup_steps}")
        self.encoder = encoder
        self.beta = beta
        self.kl_warmup_steps = kl_warmup_steps

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance for images x (B, C, H, W): two (B, latent_dim)."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean, the VAE's deterministic code."""
        return self.posterior(x)[0]

    def kl_weight(self, step: int | None) -> float:
        """The KL weight at optimiser step ``step``; ``None`` (evaluation) gives beta."""
        if step is None or self.kl_warmup_steps == 0:
            return self.beta
        return self.beta * min(1.0, (step + 1) / self.kl_warmup_steps)

    def loss(self, x: torch.Tensor, step: int | None = None) -> dict[str, torch.Tensor]:
        """Loss terms for a batch x (B, C, H, W); per image, averaged over the batch.

        ``recon`` is -log p(x | z) for one z ~ q(z | x), summed over pixels; ``kl`` is
        KL(q(z | x) || p(z)); ``elbo = -(recon + kl)`` in nats per image; ``loss = recon +
        kl_weight(step) * kl``. ``recon_mse`` is the squared error of the reconstruction: from the
        sampled z in training (no extra decoder pass), from z = posterior mean in evaluation, so
        that it is deterministic and comparable with the other models.
        """
        mu, logvar = self.posterior(x)  # (B, D) each
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        output = self.decoder(z)  # (B, C, H, W)
        recon = -self.likelihood.log_prob(x, output)  # (B,)
        kl = gaussian_kl(mu, logvar)  # (B,)
        loss = (recon + self.kl_weight(step) * kl).mean()
        with torch.no_grad():
            reconstruction = self.likelihood.mean(output) if self.training else self.decode(mu)
            recon_mse = squared_error(x, reconstruction).mean()
        return {
            "loss": loss,
            "recon": recon.mean(),
            "kl": kl.mean(),
            "elbo": -(recon + kl).mean(),
            "recon_mse": recon_mse,
        }

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decodes n draws from the prior N(0, I): images (n, C, H, W) (the likelihood's mean)."""
        z = torch.randn(n, self.latent_dim, device=self.device, generator=generator)
        return self.decode(z)
