"""Builders that the ``model=`` configs point at: flat config values in, composed model out.

The image shape is not in the model config; the trainer passes the data module's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vae_experiments.models.autoencoder import Autoencoder
from vae_experiments.models.corruption import build_corruption
from vae_experiments.models.likelihoods import build_likelihood
from vae_experiments.models.networks import build_encoder_decoder
from vae_experiments.models.vae import VAE


def build_autoencoder(
    image_shape: Sequence[int],
    latent_dim: int,
    arch: str,
    recon_loss: str,
    hidden_dims: Sequence[int] | None = None,
    conv_channels: Sequence[int] | None = None,
    noise: Mapping | None = None,
) -> Autoencoder:
    """An autoencoder; ``arch=linear`` gives the linear AE, a ``noise`` the denoising AE.

    Args:
        image_shape: (C, H, W) of the data.
        latent_dim: size of the code.
        arch: ``linear``, ``mlp`` or ``conv``.
        recon_loss: ``mse`` (squared error, linear output) or ``bce`` (cross-entropy on logits).
        hidden_dims: MLP hidden sizes (``arch=mlp``).
        conv_channels: conv block channels (``arch=conv``).
        noise: ``{kind: gaussian, std: ...}`` or ``{kind: mask, p: ...}`` for a denoising AE.
    """
    encoder, decoder = build_encoder_decoder(
        arch, image_shape, latent_dim, latent_dim, hidden_dims, conv_channels
    )
    corruption = None
    if noise is not None:
        corruption = build_corruption(noise["kind"], noise.get("std"), noise.get("p"))
    return Autoencoder(encoder, decoder, build_likelihood(recon_loss), latent_dim, corruption)


def build_vae(
    image_shape: Sequence[int],
    latent_dim: int,
    arch: str,
    likelihood: str,
    beta: float,
    kl_warmup_steps: int,
    hidden_dims: Sequence[int] | None = None,
    conv_channels: Sequence[int] | None = None,
    sigma: float | None = None,
    learn_sigma: bool = False,
) -> VAE:
    """A VAE with a Gaussian posterior; the encoder emits 2 * latent_dim features.

    Args:
        likelihood: ``bernoulli`` (logits) or ``gaussian`` (``sigma``, fixed or learned).
        beta: KL weight; kl_warmup_steps: linear KL warm-up length in optimiser steps.
        Others as in :func:`build_autoencoder`.
    """
    encoder, decoder = build_encoder_decoder(
        arch, image_shape, latent_dim, 2 * latent_dim, hidden_dims, conv_channels
    )
    return VAE(
        encoder,
        decoder,
        build_likelihood(likelihood, sigma, learn_sigma),
        latent_dim,
        beta=beta,
        kl_warmup_steps=kl_warmup_steps,
    )
