"""The conditional VAE: the VAE with its encoder and decoder given the image's class."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vae_experiments.models.likelihoods import Likelihood
from vae_experiments.models.networks import ImageShape, Network
from vae_experiments.models.vae import VAE
from vae_experiments.targets import ConfigError


class _Conditioned(Network):
    """``body``'s encoder for images with ``features`` condition values beside each (in the
    body's own way: :meth:`Network.condition_shape`), and its decoder for latents with the
    values appended."""

    def __init__(self, body: Network, features: int):
        self.body = body
        self.features = features

    def encoder(self, image_shape: Sequence[int], out_features: int) -> nn.Module:
        shape: ImageShape = self.body.condition_shape(image_shape, self.features)
        return self.body.encoder(shape, out_features)

    def decoder(self, image_shape: Sequence[int], latent_dim: int) -> nn.Module:
        return self.body.decoder(image_shape, latent_dim + self.features)


class CVAE(VAE):
    """Conditional VAE (Sohn et al. 2015, "Learning Structured Output Representation using
    Deep Conditional Generative Models", https://papers.nips.cc/paper/5775): q(z | x, y),
    p(x | z, y) and the prior p(z) = N(0, I), for images x with class labels y.

    It is the VAE with a one-hot label beside the encoder's image (as the body takes it: extra
    input features for an MLP, constant channels for a conv net) and appended to the decoder's
    z; the bounds are the VAE's, conditioned on y: the ELBO
    ``E_q[log p(x | z, y)] - KL(q(z | x, y) || N(0, I))`` <= log p(x | y), or with ``k > 1``
    the importance-weighted bound on log p(x | y). Every method takes the labels ``y`` (B,)
    beside the images or latents and needs them, except :meth:`sample`, which draws classes
    uniformly when none are given.

    Labels are not checked against ``num_classes`` here (a host sync per step): the data
    checks its labels when it is loaded, and ``scripts/sample.py`` its ``label=``; a label
    out of range gets an all-zero condition.

    Args:
        image_shape: (C, H, W) of the data; the trainer passes the data module's.
        num_classes: the classes of the labels; the trainer passes the data's.
        latent_dim, network, likelihood, beta, kl_warmup_steps, k: as for :class:`VAE`.
    """

    needs_labels = True

    def __init__(
        self,
        image_shape: Sequence[int],
        num_classes: int,
        latent_dim: int,
        network: Network,
        likelihood: Likelihood,
        beta: float,
        kl_warmup_steps: int,
        k: int,
    ):
        if num_classes < 1:
            raise ConfigError("num_classes", num_classes, "must be an integer >= 1")
        conditioned = _Conditioned(network, num_classes)
        super().__init__(image_shape, latent_dim, conditioned, likelihood, beta, kl_warmup_steps, k)
        self.num_classes = num_classes
        self.body = network  # how the encoder takes the condition (a plain object, no weights)

    def condition(self, y: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """One-hot vectors (B, num_classes) of labels y (B,), in ``like``'s dtype and device."""
        if y is None:
            raise ValueError(
                f"{type(self).__name__} needs the class labels y (B,) of its images beside them"
            )
        # A comparison, not F.one_hot: no check of the values, so no host sync per step.
        classes = torch.arange(self.num_classes, device=like.device)
        return (y.to(like.device)[:, None] == classes).to(like.dtype)

    def encoder_input(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.body.add_condition(x, self.condition(y, x))

    def decoder_input(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return torch.cat([z, self.condition(y, z)], dim=1)  # (B, latent_dim + num_classes)

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decodes n draws from the prior for labels y (n,): images (n, C, H, W). Without
        ``y``, each image's class is drawn uniformly (with ``generator``) first."""
        if y is None:
            where = generator.device if generator is not None else self.device
            y = torch.randint(self.num_classes, (n,), generator=generator, device=where)
        return self.decode(self.sample_codes(n, generator), y.to(self.device))
