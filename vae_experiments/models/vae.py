"""Variational autoencoder with a diagonal Gaussian posterior and a standard normal prior."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributions import Independent, Normal

from vae_experiments.models.base import LatentModel, squared_error
from vae_experiments.models.likelihoods import Likelihood
from vae_experiments.models.networks import Network
from vae_experiments.targets import ConfigError


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per row, summed over latent dims: (B, D) -> (B,)."""
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(1)


class VAE(LatentModel):
    """VAE trained on the (beta-weighted) negative ELBO (Kingma & Welling 2013,
    https://arxiv.org/abs/1312.6114; beta: Higgins et al. 2017).

    The encoder outputs 2 * latent_dim features, read as the posterior mean and log-variance;
    z is drawn with the reparameterisation trick and the KL to the prior is analytic.

    Args:
        image_shape: (C, H, W) of the data; the trainer passes the data module's.
        latent_dim: size of z.
        network: builds the encoder, images (B, C, H, W) -> (B, 2 * latent_dim), and the
            decoder, latents (B, latent_dim) -> decoder output (B, C, H, W).
        likelihood: p(x | z) given the decoder output.
        beta: weight of the KL term in the training loss (1 gives the ELBO).
        kl_warmup_steps: the KL weight rises linearly from beta / kl_warmup_steps to beta over
            this many optimiser steps (0 for no warm-up; Bowman et al. 2016).
    """

    has_prior = True

    def __init__(
        self,
        image_shape: Sequence[int],
        latent_dim: int,
        network: Network,
        likelihood: Likelihood,
        beta: float,
        kl_warmup_steps: int,
    ):
        if beta < 0:
            raise ConfigError("beta", beta, "must be a number >= 0")
        if kl_warmup_steps < 0:
            raise ConfigError("kl_warmup_steps", kl_warmup_steps, "must be an integer >= 0")
        super().__init__(image_shape, latent_dim, network, likelihood, 2 * latent_dim)
        self.beta = beta
        self.kl_warmup_steps = kl_warmup_steps

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance for images x (B, C, H, W): two (B, latent_dim)."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    @staticmethod
    def reparameterise(mu: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z = mu + std * noise: a draw from q(z | x) = N(mu, diag(exp(logvar))) for standard
        normal ``noise``; shapes broadcast (mu (B, 1, D) with noise (B, K, D) gives K per image)."""
        return mu + torch.exp(0.5 * logvar) * noise

    def prior(self, like: torch.Tensor) -> Independent:
        """p(z) = N(0, I) over latent vectors (event shape (latent_dim,)), on ``like``'s device
        and dtype."""
        zeros = like.new_zeros(self.latent_dim)
        return Independent(Normal(zeros, torch.ones_like(zeros)), 1)

    def log_importance_weights(
        self,
        x: torch.Tensor,
        noise: torch.Tensor,
        posterior: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log importance weights of K posterior samples per image, for IWAE estimates
        (Burda et al. 2015, https://arxiv.org/abs/1509.00519).

        Sample k of image b is ``z = mu_b + std_b * noise[b, k]``, and its log-weight is
        ``log p(x_b | z) + log p(z) - log q(z | x_b)``. Each term is summed over pixels or
        latent dims; nothing is averaged. log q is computed from the noise (the change of
        variables ``log q(z | x) = log N(noise; 0, I) - sum(log std)``), which is exact even where
        a posterior std is tiny and ``(z - mu) / std`` would lose precision.

        Args:
            x: images (B, C, H, W).
            noise: standard normal draws (B, K, D).
            posterior: ``posterior(x)`` if already computed, (mu, logvar), each (B, D): saves
                the encoder pass when the samples of a batch come in chunks.

        Returns:
            ``(log_w, log_px_z)``: the log-weights and their log p(x | z) term, (B, K) each, in
            the model's dtype. ``logsumexp(log_w, 1) - log K`` is the IWAE estimate of log p(x).
        """
        mu, logvar = self.posterior(x) if posterior is None else posterior
        n, k = noise.shape[:2]  # images, samples per image
        z = self.reparameterise(mu[:, None], logvar[:, None], noise)  # (B, K, D)
        output = self.decoder(z.reshape(n * k, -1))  # (B * K, C, H, W)
        targets = x[:, None].expand(n, k, *x.shape[1:]).reshape(n * k, *x.shape[1:])
        log_px_z = self.likelihood.log_prob(targets, output).view(n, k)
        prior = self.prior(z)
        log_qz = prior.log_prob(noise) - 0.5 * logvar.sum(1, keepdim=True)  # (B, K)
        return log_px_z + prior.log_prob(z) - log_qz, log_px_z

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
        z = self.reparameterise(mu, logvar, torch.randn_like(mu))
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
