"""VAEs whose objective targets disentangled codes: β-VAE with capacity annealing (Burgess et al.
2018), β-TCVAE (Chen et al. 2018) and FactorVAE (Kim & Mnih 2018).

Each is the :class:`~vae_experiments.models.vae.VAE` (its posterior, prior, decoder, likelihood
and log-likelihood evaluation) with another training loss; ``elbo``, ``recon`` and ``kl`` are the
VAE's (the true ELBO with the analytic KL), so runs of all of them compare on the same terms.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vae_experiments.models.adversary import ADVERSARY_LOSS, OptimizerFactory
from vae_experiments.models.base import squared_error
from vae_experiments.models.likelihoods import Likelihood
from vae_experiments.models.networks import Network
from vae_experiments.models.vae import (
    VAE,
    _gaussian_log_prob,
    _standard_normal_log_prob,
    gaussian_kl,
)
from vae_experiments.targets import ConfigError


class CapacityVAE(VAE):
    """β-VAE with a controlled capacity (Burgess et al. 2018, "Understanding disentangling in
    β-VAE", https://arxiv.org/abs/1804.03599, eq. 8): ``loss = recon + gamma * |kl - C|``, the
    target KL ``C`` rising linearly from 0 to ``capacity_max`` nats over ``capacity_steps``
    optimiser steps and staying there; ``recon`` and ``kl`` are the batch means (per image) of
    the VAE's terms, so ``|kl - C|`` is taken on the batch's mean KL, as in the paper.

    Logged beside the VAE's terms: ``capacity`` (C at this step; ``capacity_max`` in
    evaluation, whose ``loss`` is the objective at the end of the schedule).

    Args:
        image_shape, latent_dim, network, likelihood: as for :class:`VAE`.
        gamma: weight of ``|kl - C|`` (the paper: 1000 on dSprites).
        capacity_max: the KL the schedule ends at, in nats per image (the paper: 25).
        capacity_steps: optimiser steps over which C rises from 0 (the paper: 100,000); 0: C is
            ``capacity_max`` from the first step.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        latent_dim: int,
        network: Network,
        likelihood: Likelihood,
        gamma: float,
        capacity_max: float,
        capacity_steps: int,
    ):
        if gamma < 0:
            raise ConfigError("gamma", gamma, "must be a number >= 0")
        if capacity_max < 0:
            raise ConfigError("capacity_max", capacity_max, "must be a number of nats >= 0")
        if capacity_steps < 0:
            raise ConfigError("capacity_steps", capacity_steps, "must be an integer >= 0")
        super().__init__(image_shape, latent_dim, network, likelihood, 1.0, 0, 1)
        self.gamma = gamma
        self.capacity_max = capacity_max
        self.capacity_steps = capacity_steps

    def capacity(self, step: int | None) -> float:
        """C at optimiser step ``step`` (counted from 0); ``None`` (evaluation): ``capacity_max``."""
        if step is None or self.capacity_steps == 0:
            return self.capacity_max
        return self.capacity_max * min(1.0, step / self.capacity_steps)

    def loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        step: int | None = None,
        monitor: bool = True,
    ) -> dict[str, torch.Tensor]:
        """The VAE's terms for images x (B, C, H, W), with ``loss = recon + gamma * |kl - C|``
        (batch means, nats per image) and ``capacity`` = C; ``monitor=False`` leaves out what
        the VAE's leaves out (``elbo``, ``recon_mse``), and ``loss`` is the same."""
        terms = super().loss(x, y, step, monitor=monitor)  # the VAE's (its loss is replaced)
        capacity = self.capacity(step)
        terms["loss"] = terms["recon"] + self.gamma * (terms["kl"] - capacity).abs()
        terms["capacity"] = terms["loss"].new_tensor(capacity)
        return terms


def mws_kl_terms(
    z: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    log_qz_x: torch.Tensor,
    dataset_size: int,
) -> dict[str, torch.Tensor]:
    """The KL of each sampled code split into index-code mutual information, total correlation
    and dimension-wise KL (Chen et al. 2018, https://arxiv.org/abs/1802.04942, eq. 2), with
    q(z) estimated by minibatch-weighted sampling (section 3.1, eq. 4):
    ``log q(z_i) ~ log sum_j q(z_i | x_j) - log(N B)`` over the batch's B images, N images in
    the dataset, and likewise each marginal ``log q(z_id)``.

    Args:
        z: one code per image drawn from its posterior, (B, D).
        mu, logvar: the posteriors, (B, D) each.
        log_qz_x: log q(z_i | x_i), (B,).
        dataset_size: N, the training set's size.

    Returns:
        ``mi``, ``tc``, ``dim_kl``: (B,) each, per image, nothing averaged;
        ``mi + tc + dim_kl = log q(z | x) - log p(z)``, the one-sample estimate of the KL.
    """
    batch = z.shape[0]
    # log q(z_i | x_j) per latent dim: (B, B, D), sample i down the rows, image j across.
    log_q = _gaussian_log_prob(z[:, None, :, None], mu[None, :, :, None], logvar[None, :, :, None])
    log_norm = math.log(batch * dataset_size)
    log_qz = torch.logsumexp(log_q.sum(2), dim=1) - log_norm  # (B,)
    log_qz_product = (torch.logsumexp(log_q, dim=1) - log_norm).sum(1)  # (B,): sum_d log q(z_id)
    log_pz = _standard_normal_log_prob(z)  # (B,)
    return {
        "mi": log_qz_x - log_qz,
        "tc": log_qz - log_qz_product,
        "dim_kl": log_qz_product - log_pz,
    }


class BetaTCVAE(VAE):
    """β-TCVAE (Chen et al. 2018, "Isolating Sources of Disentanglement in Variational
    Autoencoders", https://arxiv.org/abs/1802.04942, eq. 4): the VAE's KL split into index-code
    mutual information, total correlation and dimension-wise KL (:func:`mws_kl_terms`, by
    minibatch-weighted sampling), each weighted:
    ``loss = recon + alpha * mi + beta * tc + gamma * dim_kl``, per image, averaged over the
    batch. With ``alpha = beta = gamma = 1`` it is the VAE's loss with a one-sample KL.

    Logged beside the VAE's terms (``elbo`` is the true ELBO with the analytic KL): ``mi``,
    ``tc`` and ``dim_kl``, per image, batch means (in evaluation too, from the batch's codes).

    Args:
        image_shape, latent_dim, network, likelihood: as for :class:`VAE`.
        dataset_size: N, the training set's size, which minibatch-weighted sampling weights
            by; training supplies it from the data (``model.dataset_size``). It shifts the
            logged ``mi``, ``tc`` and ``dim_kl`` by constants and changes no gradient.
        alpha: weight of the index-code mutual information (the paper: 1).
        beta: weight of the total correlation (the paper varies it; the authors' dSprites
            example uses 6).
        gamma: weight of the dimension-wise KL (the paper: 1).
    """

    #: Training supplies ``dataset_size`` from the data, as ``image_shape``
    #: (:func:`vae_experiments.config_checks.supply_model_args`).
    needs_dataset_size = True

    def __init__(
        self,
        image_shape: Sequence[int],
        latent_dim: int,
        network: Network,
        likelihood: Likelihood,
        dataset_size: int,
        alpha: float,
        beta: float,
        gamma: float,
    ):
        if dataset_size < 1:
            raise ConfigError("dataset_size", dataset_size, "must be an integer >= 1")
        for name, weight in (("alpha", alpha), ("gamma", gamma)):
            if weight < 0:
                raise ConfigError(name, weight, "must be a number >= 0")
        super().__init__(image_shape, latent_dim, network, likelihood, beta, 0, 1)
        self.dataset_size = int(dataset_size)
        self.alpha = alpha
        self.gamma = gamma

    def loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        step: int | None = None,
        monitor: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Terms for images x (B, C, H, W), per image, averaged over the batch: ``recon``
        (-log p(x | z), one z per image), ``mi``, ``tc``, ``dim_kl`` (:func:`mws_kl_terms`),
        ``loss = recon + alpha * mi + beta * tc + gamma * dim_kl``, and the VAE's ``kl``,
        ``elbo`` and ``recon_mse`` (the last two left out with ``monitor=False``; ``loss`` is
        the same)."""
        codes = _sampled_codes(self, x, y)
        log_qz_x = _standard_normal_log_prob(codes.noise) - 0.5 * codes.logvar.sum(1)  # (B,)
        split = mws_kl_terms(codes.z, codes.mu, codes.logvar, log_qz_x, self.dataset_size)
        loss = (
            codes.recon
            + self.alpha * split["mi"]
            + self.beta * split["tc"]
            + self.gamma * split["dim_kl"]
        )
        kl = gaussian_kl(codes.mu, codes.logvar)  # (B,): analytic, for the true ELBO
        terms = {"loss": loss.mean(), "recon": codes.recon.mean()}
        terms.update({name: value.mean() for name, value in split.items()})
        terms["kl"] = kl.mean()
        if monitor:
            terms["elbo"] = -(codes.recon + kl).mean()
            terms["recon_mse"] = _recon_mse(self, x, y, codes)
        return terms


class FactorVAE(VAE):
    """FactorVAE (Kim & Mnih 2018, "Disentangling by Factorising",
    https://arxiv.org/abs/1802.05983, eq. 2 and algorithm 2): the VAE's loss plus
    ``gamma`` times the total correlation of the codes, estimated by a discriminator D that
    tells codes z ~ q(z) from codes whose dimensions were permuted independently across the
    batch (:func:`permute_dims`, samples of prod_d q(z_d)): ``TC ~ E_q(z)[log D(z) / (1 -
    D(z))]``, the discriminator's logit (the density-ratio trick).

    A model with an adversary (:mod:`~vae_experiments.models.adversary`): D is trained by its
    own optimizer (``adversary_optimizer``) on ``adversary_loss``, the binary cross-entropy of
    D on the batch's first half of codes (label 1) and the permuted codes of its second half
    (label 0), both detached, as the paper's algorithm draws a second minibatch for them. The
    VAE's loss reaches D's parameters only through the TC term; their gradients from it are
    discarded (the adversary's optimizer zeroes them before its own backward pass).

    Logged beside the VAE's terms: ``tc`` (D's estimate, per image, batch mean) and
    ``adversary_loss``.

    Args:
        image_shape, latent_dim, network, likelihood: as for :class:`VAE`.
        gamma: weight of the TC term (35 for dSprites, the value issue 23 quotes from the
            paper; the paper sweeps it).
        discriminator_dims: D's hidden widths (the paper: 5 layers of 1000 units, with leaky
            ReLUs of slope 0.2, and an output layer: 6 layers).
        adversary_optimizer: a partial optimizer taking D's parameters (the paper: Adam,
            lr 1e-4, betas (0.5, 0.9)); built once here on a stand-in parameter, so that a value
            torch refuses fails when the model is built.
    """

    has_adversary = True
    #: Training batches hold at least this many images (checked with the config).
    min_batch_size = 2
    min_batch_reason = "its discriminator compares codes with codes permuted across the batch"

    def __init__(
        self,
        image_shape: Sequence[int],
        latent_dim: int,
        network: Network,
        likelihood: Likelihood,
        gamma: float,
        discriminator_dims: list[int],
        adversary_optimizer: OptimizerFactory,
    ):
        if gamma < 0:
            raise ConfigError("gamma", gamma, "must be a number >= 0")
        dims = [int(d) for d in discriminator_dims]
        if not dims or min(dims) < 1:
            raise ConfigError(
                "discriminator_dims", list(discriminator_dims), "must be one or more widths >= 1"
            )
        super().__init__(image_shape, latent_dim, network, likelihood, 1.0, 0, 1)
        self.gamma = gamma
        layers: list[nn.Module] = []
        for width_in, width_out in zip([latent_dim, *dims[:-1]], dims, strict=True):
            layers += [nn.Linear(width_in, width_out), nn.LeakyReLU(0.2)]
        # Codes (B, latent_dim) -> one logit each, log D / (1 - D), D = P(not permuted).
        self.discriminator = nn.Sequential(*layers, nn.Linear(dims[-1], 1))
        adversary_optimizer([nn.Parameter(torch.zeros(1))])  # refused values fail here
        self.adversary_optimizer = adversary_optimizer

    def adversary_parameters(self) -> Iterator[nn.Parameter]:
        """D's parameters: what ``adversary_optimizer`` trains."""
        return self.discriminator.parameters()

    def discriminator_loss(self, z: torch.Tensor) -> torch.Tensor:
        """D's binary cross-entropy on codes z (B, D), B >= 2: the first B // 2 as codes of
        q(z) (label 1), the next B // 2 with their dimensions permuted (:func:`permute_dims`,
        label 0), as the paper's two minibatches; mean over the 2 * (B // 2) codes."""
        half = z.shape[0] // 2
        if half == 0:
            raise ValueError(
                "FactorVAE needs batches of at least 2 images: its discriminator compares codes "
                "with codes permuted across the batch"
            )
        real = self.discriminator(z[:half]).squeeze(1)  # (B // 2,) logits
        permuted = self.discriminator(permute_dims(z[half : 2 * half])).squeeze(1)
        # -log D(z) - log(1 - D(z_perm)), with D = sigmoid(logit).
        return 0.5 * (F.softplus(-real).mean() + F.softplus(permuted).mean())

    def loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        step: int | None = None,
        monitor: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Terms for images x (B, C, H, W), B >= 2, per image, averaged over the batch:
        ``loss = recon + kl + gamma * tc`` (``tc`` D's logit of each image's code), and
        ``adversary_loss`` (D's binary cross-entropy, mean over its 2 * (B // 2) codes); the
        VAE's ``kl``, ``elbo`` and ``recon_mse`` (the last two left out with
        ``monitor=False``; ``loss`` is the same)."""
        codes = _sampled_codes(self, x, y)
        kl = gaussian_kl(codes.mu, codes.logvar)  # (B,)
        tc = self.discriminator(codes.z).squeeze(1)  # (B,)
        adversary = self.discriminator_loss(codes.z.detach())
        terms = {
            "loss": (codes.recon + kl + self.gamma * tc).mean(),
            "recon": codes.recon.mean(),
            "kl": kl.mean(),
            "tc": tc.mean(),
            ADVERSARY_LOSS: adversary,
        }
        if monitor:
            terms["elbo"] = -(codes.recon + kl).mean()
            terms["recon_mse"] = _recon_mse(self, x, y, codes)
        return terms


def permute_dims(z: torch.Tensor) -> torch.Tensor:
    """Each latent dimension of codes z (B, D) shuffled across the batch by its own random
    permutation (Kim & Mnih 2018, algorithm 1): samples of the product of the marginals."""
    order = torch.rand(z.shape, device=z.device).argsort(0)  # (B, D): a permutation per column
    return z.gather(0, order)


class _Codes(NamedTuple):
    """One posterior sample per image and its reconstruction term (shapes in
    :func:`_sampled_codes`)."""

    mu: torch.Tensor
    logvar: torch.Tensor
    noise: torch.Tensor
    z: torch.Tensor
    output: torch.Tensor
    recon: torch.Tensor


def _sampled_codes(model: VAE, x: torch.Tensor, y: torch.Tensor | None) -> _Codes:
    """The posterior (``mu``, ``logvar``, (B, D) each) of images x (B, C, H, W), one code per
    image (``z`` (B, D), from standard normal ``noise`` (B, D)), the decoder's ``output`` for
    it and ``recon`` = -log p(x | z) per image (B,), summed over pixels."""
    mu, logvar = model.posterior(x, y)
    noise = torch.randn_like(mu)
    z = model.reparameterise(mu, logvar, noise)
    output = model.decoder(model.decoder_input(z, y))  # (B, C, H, W)
    recon = -model.likelihood.log_prob(x, output)
    return _Codes(mu=mu, logvar=logvar, noise=noise, z=z, output=output, recon=recon)


def _recon_mse(model: VAE, x: torch.Tensor, y: torch.Tensor | None, codes: _Codes) -> torch.Tensor:
    """The squared error of the reconstruction, batch mean: from the sampled z in training,
    from the posterior mean in evaluation, as :meth:`VAE.loss` has it."""
    with torch.no_grad():
        if model.training:
            reconstruction = model.likelihood.mean(codes.output)
        else:
            reconstruction = model.decode(codes.mu, y)
        return squared_error(x, reconstruction).mean()
