"""Variational autoencoders: a diagonal Gaussian posterior and a standard normal prior (VAE),
trained on the ELBO or the importance-weighted bound (IWAE), and a stack of Gaussian latent layers
(HierarchicalVAE). Every bound comes from one function of log-weights, :meth:`VAE.log_importance_weights`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.distributions import Independent, Normal

from vae_experiments.models.base import LatentModel, squared_error
from vae_experiments.models.likelihoods import Likelihood
from vae_experiments.models.networks import MLP, Linear, Network
from vae_experiments.targets import ConfigError


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per row, summed over latent dims: (B, D) -> (B,)."""
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(1)


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """The importance-weighted bound of K log-weights per image: (B, K) -> (B,).

    ``log (1/K) sum_k w_k`` (Burda et al. 2015, https://arxiv.org/abs/1509.00519, eq. 8); K = 1
    gives the log-weight itself, the single-sample ELBO.
    """
    return torch.logsumexp(log_w, 1) - math.log(log_w.shape[1])


def _randn(*shape: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard normal draws on the generator's device (a CPU generator gives the same draws
    for a model on any device), moved to ``device``."""
    where = generator.device if generator is not None else device
    return torch.randn(*shape, generator=generator, device=where).to(device)


def _standard_normal_log_prob(noise: torch.Tensor) -> torch.Tensor:
    """log N(noise; 0, I), summed over the last dim: (..., D) -> (...)."""
    return -0.5 * (noise.square() + math.log(2 * math.pi)).sum(-1)


def _gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))), summed over the last dim: (..., D) -> (...)."""
    return -0.5 * ((z - mu).square() * torch.exp(-logvar) + logvar + math.log(2 * math.pi)).sum(-1)


class VAE(LatentModel):
    """VAE trained on the (beta-weighted) negative ELBO (Kingma & Welling 2013,
    https://arxiv.org/abs/1312.6114; beta: Higgins et al. 2017), or with ``k > 1`` on the
    importance-weighted bound (IWAE, Burda et al. 2015, https://arxiv.org/abs/1509.00519).

    The encoder outputs 2 * latent_dim features, read as the posterior mean and log-variance;
    z is drawn with the reparameterisation trick. With ``k = 1`` the loss is the negative ELBO
    with the analytic KL to the prior (exactly the VAE of Kingma & Welling); with ``k > 1`` it is
    ``-log (1/k) sum_k w_k`` over k samples per image (eq. 8), gradients flowing through the
    reparameterised samples, and the log-weights are those of :meth:`log_importance_weights`,
    the same code that evaluation uses.

    Args:
        image_shape: (C, H, W) of the data; the trainer passes the data module's.
        latent_dim: size of z.
        network: builds the encoder, images (B, C, H, W) -> (B, 2 * latent_dim), and the
            decoder, latents (B, latent_dim) -> decoder output (B, C, H, W).
        likelihood: p(x | z) given the decoder output.
        beta: weight of the KL term in the training loss (1 gives the ELBO).
        kl_warmup_steps: the KL weight rises linearly from beta / kl_warmup_steps to beta over
            this many optimiser steps (0 for no warm-up; Bowman et al. 2016).
        k: importance samples per image in training (1: the ELBO). The importance-weighted
            bound has no separate KL term, so ``k > 1`` needs ``beta = 1`` and no warm-up. The
            default is for run configs saved before the key existed; configs give it.
    """

    has_prior = True
    #: Whether KL(q(z | x) || p(z)) has the closed form :func:`gaussian_kl` (one Gaussian layer
    #: against N(0, I)); a stack estimates it from its samples.
    analytic_kl = True

    def __init__(
        self,
        image_shape: Sequence[int],
        latent_dim: int,
        network: Network,
        likelihood: Likelihood,
        beta: float,
        kl_warmup_steps: int,
        k: int = 1,
    ):
        if beta < 0:
            raise ConfigError("beta", beta, "must be a number >= 0")
        if kl_warmup_steps < 0:
            raise ConfigError("kl_warmup_steps", kl_warmup_steps, "must be an integer >= 0")
        if k < 1:
            raise ConfigError("k", k, "must be an integer >= 1 (1: the ELBO)")
        weighted = "the importance-weighted bound (k > 1) has no separate KL term to weight"
        if k > 1 and beta != 1:
            raise ConfigError(
                "beta", beta, f"must be 1 with k={k}: {weighted}; use k=1 for a beta-VAE"
            )
        if k > 1 and kl_warmup_steps != 0:
            raise ConfigError(
                "kl_warmup_steps", kl_warmup_steps, f"must be 0 with k={k}: {weighted}"
            )
        super().__init__(image_shape, latent_dim, network, likelihood, 2 * latent_dim)
        self.beta = beta
        self.kl_warmup_steps = kl_warmup_steps
        self.k = k
        #: Sizes of the latent layers, from the image side; one layer here.
        self.latent_dims = [latent_dim]

    @property
    def noise_dim(self) -> int:
        """Standard normal draws per sample: the sizes of all latent layers together."""
        return sum(self.latent_dims)

    def posterior(
        self, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance for images x (B, C, H, W) (with labels y (B,) where
        the model is conditional): two (B, latent_dim)."""
        mu, logvar = self.encoder(self.encoder_input(x, y)).chunk(2, dim=1)
        return mu, logvar

    def posterior_means(self, x: torch.Tensor, y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """E_q[z | x] of each latent layer, (B, D_l) each, for counting active units."""
        return [self.posterior(x, y)[0]]

    @staticmethod
    def reparameterise(mu: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z = mu + std * noise: a draw from q(z | x) = N(mu, diag(exp(logvar))) for standard
        normal ``noise``; shapes broadcast (mu (B, 1, D) with noise (B, K, D) gives K per image)."""
        return mu + torch.exp(0.5 * logvar) * noise

    def prior(self, like: torch.Tensor) -> Independent:
        """p(z) = N(0, I) over latent vectors (event shape (latent_dim,)), on ``like``'s device
        and dtype."""
        zeros = like.new_zeros(self.latent_dim)
        # No argument validation: a non-finite code must reach the training's non-finite check
        # (which names the step and the terms), not fail inside torch.distributions.
        normal = Normal(zeros, torch.ones_like(zeros), validate_args=False)
        return Independent(normal, 1, validate_args=False)

    def log_prior(self, z: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """log p(z) of codes z (B, K, latent_dim): (B, K). ``noise`` (B, K, 0) is unused here;
        a stacked model draws its upper layers with it."""
        return self.prior(z).log_prob(z)

    def _log_weights(
        self,
        x: torch.Tensor,
        noise: torch.Tensor,
        posterior: tuple[torch.Tensor, torch.Tensor],
        y: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`log_importance_weights` and the decoder output (B * K, C, H, W)."""
        mu, logvar = posterior
        n, k = noise.shape[:2]  # images, samples per image
        eps, upper = noise[..., : self.latent_dim], noise[..., self.latent_dim :]
        z = self.reparameterise(mu[:, None], logvar[:, None], eps)  # (B, K, D)
        # Each image's label for each of its K samples: (B * K,), as z is reshaped.
        labels = None if y is None else y.repeat_interleave(k, dim=0)
        output = self.decoder(self.decoder_input(z.reshape(n * k, -1), labels))  # (B * K, C, H, W)
        targets = x[:, None].expand(n, k, *x.shape[1:]).reshape(n * k, *x.shape[1:])
        log_px_z = self.likelihood.log_prob(targets, output).view(n, k)
        log_qz = _standard_normal_log_prob(eps) - 0.5 * logvar.sum(1, keepdim=True)  # (B, K)
        return log_px_z + self.log_prior(z, upper) - log_qz, log_px_z, output

    def log_importance_weights(
        self,
        x: torch.Tensor,
        noise: torch.Tensor,
        posterior: tuple[torch.Tensor, torch.Tensor] | None = None,
        y: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log importance weights of K posterior samples per image, for the IWAE bound in
        training and the IWAE estimate of log p(x) in evaluation (Burda et al. 2015,
        https://arxiv.org/abs/1509.00519).

        Sample k of image b is ``z = mu_b + std_b * noise[b, k]``, and its log-weight is
        ``log p(x_b | z) + log p(z) - log q(z | x_b)``. Each term is summed over pixels or
        latent dims; nothing is averaged. log q is computed from the noise (the change of
        variables ``log q(z | x) = log N(noise; 0, I) - sum(log std)``), which is exact even where
        a posterior std is tiny and ``(z - mu) / std`` would lose precision.

        Args:
            x: images (B, C, H, W).
            noise: standard normal draws (B, K, noise_dim) (``noise_dim`` = latent_dim for one
                latent layer, the sum of the layers' sizes for a stack, lowest layer first).
            posterior: ``posterior(x, y)`` if already computed, (mu, logvar), each
                (B, latent_dim): saves the encoder pass when the samples of a batch come in
                chunks.
            y: the images' labels (B,), for a conditional model (its weights are those of
                log p(x | y)); ignored by others.

        Returns:
            ``(log_w, log_px_z)``: the log-weights and their log p(x | z) term, (B, K) each, in
            the model's dtype. :func:`iwae_bound` of ``log_w`` is the IWAE estimate of log p(x).
        """
        posterior = self.posterior(x, y) if posterior is None else posterior
        log_w, log_px_z, _ = self._log_weights(x, noise, posterior, y)
        return log_w, log_px_z

    def kl_estimate(
        self, posterior: tuple[torch.Tensor, torch.Tensor], sampled: torch.Tensor
    ) -> torch.Tensor:
        """KL(q(z | x) || p(z)) per image (B,): analytic here, so the Monte Carlo estimate
        ``sampled`` (B,) (the mean of log q - log p over the samples) is not needed."""
        return gaussian_kl(*posterior)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The posterior mean, the VAE's deterministic code."""
        return self.posterior(x, y)[0]

    def kl_weight(self, step: int | None) -> float:
        """The KL weight at optimiser step ``step``; ``None`` (evaluation) gives beta."""
        if step is None or self.kl_warmup_steps == 0:
            return self.beta
        return self.beta * min(1.0, (step + 1) / self.kl_warmup_steps)

    def loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        step: int | None = None,
        monitor: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Loss terms for a batch x (B, C, H, W) with labels y (B,) (used by a conditional
        model, where every term is conditioned on them); per image, averaged over the batch.

        With k samples z_k ~ q(z | x) per image: ``recon`` is the mean over them of
        -log p(x | z_k), summed over pixels; ``kl`` is KL(q(z | x) || p(z)) (:meth:`kl_estimate`);
        ``elbo = -(recon + kl)`` in nats per image. With ``k = 1``, ``loss = recon +
        kl_weight(step) * kl``; with ``k > 1``, ``loss = -iwae_bound`` and ``iwae_bound``
        (:func:`iwae_bound` of the k log-weights) is logged too. ``recon_mse`` is the squared
        error of the reconstruction: from the first sampled z in training (no extra decoder
        pass), from the posterior mean in evaluation, so that it is deterministic and comparable
        with the other models.

        ``monitor=False`` (a training step whose terms nobody logs) leaves out ``elbo`` and
        ``recon_mse``, and where the KL is analytic and ``k = 1`` computes neither log-weights
        nor prior densities (the ELBO's gradient needs only ``recon`` and the closed-form KL):
        ``loss``, ``recon`` and ``kl`` are the same bit for bit, from the same random draws.
        """
        mu, logvar = self.posterior(x, y)  # (B, D) each
        n = x.shape[0]
        # For k = 1 and one layer, the same draws as randn_like(mu): the VAE as it always was.
        noise = torch.randn(n, self.k, self.noise_dim, device=mu.device, dtype=mu.dtype)
        if not monitor and self.k == 1 and self.analytic_kl:
            return self._elbo_objective(x, y, noise, mu, logvar, step)
        log_w, log_px_z, output = self._log_weights(x, noise, (mu, logvar), y)  # (B, K) each
        recon = -log_px_z.mean(1)  # (B,)
        kl = self.kl_estimate((mu, logvar), (log_px_z - log_w).mean(1))  # (B,)
        terms = {}
        if self.k == 1:
            terms["loss"] = (recon + self.kl_weight(step) * kl).mean()
        else:
            bound = iwae_bound(log_w)  # (B,)
            terms["loss"] = -bound.mean()
            terms["iwae_bound"] = bound.mean()
        terms["recon"], terms["kl"] = recon.mean(), kl.mean()
        if not monitor:
            return terms
        with torch.no_grad():
            if self.training:
                first = output.view(n, self.k, *output.shape[1:])[:, 0]  # (B, C, H, W)
                reconstruction = self.likelihood.mean(first)
            else:
                reconstruction = self.decode(mu, y)
            recon_mse = squared_error(x, reconstruction).mean()
        return {**terms, "elbo": -(recon + kl).mean(), "recon_mse": recon_mse}

    def _elbo_objective(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None,
        noise: torch.Tensor,
        mu: torch.Tensor,
        logvar: torch.Tensor,
        step: int | None,
    ) -> dict[str, torch.Tensor]:
        """``loss``, ``recon`` and ``kl`` of the k = 1 ELBO with the analytic KL: one decoder
        pass, the likelihood and the closed form, nothing else. The same arithmetic, on the same
        values, as :meth:`loss`'s general path (which reaches these through the log-weights),
        so the loss and its gradients are bit for bit those of that path.

        Args:
            x: images (B, C, H, W); y: their labels (B,) or None.
            noise: standard normal draws (B, 1, latent_dim).
            mu, logvar: the posterior's (B, latent_dim) each.
            step: the optimiser step, for the KL weight.
        """
        z = self.reparameterise(mu, logvar, noise[:, 0])  # (B, D)
        output = self.decoder(self.decoder_input(z, y))  # (B, C, H, W)
        recon = -self.likelihood.log_prob(x, output)  # (B,)
        kl = gaussian_kl(mu, logvar)  # (B,)
        loss = (recon + self.kl_weight(step) * kl).mean()
        return {"loss": loss, "recon": recon.mean(), "kl": kl.mean()}

    def sample_codes(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of z from the prior N(0, I): (n, latent_dim), on the model's device (drawn on
        the generator's)."""
        return _randn(n, self.latent_dim, generator=generator, device=self.device)

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decodes n draws from the prior: images (n, C, H, W) (the likelihood's mean). The
        labels ``y`` (n,) are those of the images drawn, for a conditional model."""
        return self.decode(self.sample_codes(n, generator), y)


class HierarchicalVAE(VAE):
    """A VAE with a stack of Gaussian latent layers (Burda et al. 2015, section 5, after Rezende
    et al. 2014): q(z1 | x) q(z2 | z1) ... and p(z_L) p(z_{L-1} | z_L) ... p(z1 | z2) p(x | z1),
    p(z_L) = N(0, I), every conditional a diagonal Gaussian.

    It is the VAE whose prior over z1 is itself a latent-variable model: the log-weight of a
    sample is ``log p(x | z1) + [log p(z1 | z2) + ... + log p(z_L) - log q(z2 | z1) - ...]
    - log q(z1 | x)``, the bracket from :meth:`log_prior`, so training (ELBO with ``k = 1``,
    the IWAE bound with ``k > 1``) and evaluation share :meth:`VAE.log_importance_weights`. No
    KL is analytic here: ``kl`` is the Monte Carlo mean of ``log q(z | x) - log p(z)`` over all
    layers, and ``elbo`` the mean log-weight.

    ``encode``/``decode`` work on z1 (``latent_dim`` is ``latent_dims[0]``); ``sample`` draws
    from the top prior through every layer.

    Args:
        image_shape: (C, H, W) of the data; the trainer passes the data module's.
        latent_dims: sizes of the latent layers from the image side, e.g. [100, 50]; two or more.
        network: the body between the image and z1 (encoder to 2 * latent_dims[0]).
        upper_network: an MLP body (``mlp`` or ``linear``) between consecutive latent layers:
            z_l -> (mean, log-variance) of z_{l+1} up, z_{l+1} -> those of z_l down; each upper
            layer gets one of each, of the same widths.
        likelihood: p(x | z1) given the decoder output.
        beta, kl_warmup_steps, k: as for :class:`VAE` (the KL weighted is that of all layers).
    """

    analytic_kl = False

    def __init__(
        self,
        image_shape: Sequence[int],
        latent_dims: Sequence[int],
        network: Network,
        upper_network: Network,
        likelihood: Likelihood,
        beta: float,
        kl_warmup_steps: int,
        k: int,
    ):
        dims = [int(d) for d in latent_dims]
        if len(dims) < 2 or min(dims) < 1:
            raise ConfigError(
                "latent_dims", list(latent_dims), "must be two or more sizes >= 1 (one: model=vae)"
            )
        if not isinstance(upper_network, MLP | Linear):
            raise ConfigError(
                "upper_network",
                type(upper_network).__name__,
                "must be an MLP body (model/network@model.upper_network=mlp or linear): the "
                "layers between latent vectors are fully connected",
            )
        super().__init__(image_shape, dims[0], network, likelihood, beta, kl_warmup_steps, k)
        self.latent_dims = dims
        # Layer l (from 0): z_l -> q(z_{l+1} | z_l)'s mean and log-variance, and z_{l+1} ->
        # p(z_l | z_{l+1})'s, read from an output "image" (2, 1, D_l): MLP bodies flatten it.
        pairs = list(zip(dims[:-1], dims[1:], strict=True))  # (lower, upper) sizes
        self.upper_encoders = nn.ModuleList(
            upper_network.encoder((1, 1, lower), 2 * upper) for lower, upper in pairs
        )
        self.upper_decoders = nn.ModuleList(
            upper_network.decoder((2, 1, lower), upper) for lower, upper in pairs
        )

    def _up(self, layer: int, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z_{layer+1} | z_layer): mean and log-variance (..., D_{layer+1}) for z (..., D)."""
        out = self.upper_encoders[layer](z.reshape(-1, z.shape[-1]))  # (N, 2 * D_up)
        mu, logvar = out.view(*z.shape[:-1], -1).chunk(2, dim=-1)
        return mu, logvar

    def _down(self, layer: int, z_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z_layer | z_{layer+1}): mean and log-variance (..., D_layer) for z_up (..., D_up)."""
        out = self.upper_decoders[layer](z_up.reshape(-1, z_up.shape[-1]))  # (N, 2, 1, D)
        mu, logvar = out.view(*z_up.shape[:-1], 2, -1).unbind(-2)
        return mu, logvar

    def log_prior(self, z: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A one-sample importance estimate of log p(z1) for codes z (B, K, D_1): draws z2, ...
        from q(z2 | z1) ... with ``noise`` (B, K, D_2 + ... + D_L) and returns (B, K)
        ``log p(z1 | z2) + ... + log p(z_L) - log q(z2 | z1) - ...``."""
        total = z.new_zeros(z.shape[:-1])
        offset = 0
        for layer, size in enumerate(self.latent_dims[1:]):
            eps = noise[..., offset : offset + size]
            offset += size
            mu, logvar = self._up(layer, z)
            z_up = self.reparameterise(mu, logvar, eps)
            log_q = _standard_normal_log_prob(eps) - 0.5 * logvar.sum(-1)
            total = total + _gaussian_log_prob(z, *self._down(layer, z_up)) - log_q
            z = z_up
        return total + _standard_normal_log_prob(z)

    def posterior_means(self, x: torch.Tensor, y: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Each layer's posterior mean given the mean of the layer below (z1's is exact; the
        upper ones are the means along the path of means): (B, D_l) each."""
        means = [self.posterior(x, y)[0]]
        for layer in range(len(self.latent_dims) - 1):
            means.append(self._up(layer, means[-1])[0])
        return means

    def kl_estimate(
        self, posterior: tuple[torch.Tensor, torch.Tensor], sampled: torch.Tensor
    ) -> torch.Tensor:
        """KL(q(z | x) || p(z)) over all layers has no closed form: the Monte Carlo mean
        ``sampled`` (B,) is the estimate."""
        return sampled

    def sample_codes(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of z1 from the prior, ancestrally from z_L ~ N(0, I): (n, latent_dims[0])."""
        z = _randn(n, self.latent_dims[-1], generator=generator, device=self.device)
        for layer in reversed(range(len(self.latent_dims) - 1)):
            mu, logvar = self._down(layer, z)
            eps = _randn(*mu.shape, generator=generator, device=self.device)
            z = self.reparameterise(mu, logvar, eps)
        return z
