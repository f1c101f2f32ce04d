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

    Subclasses implement ``encode(x, y) -> (B, latent_dim)``, ``loss(x, y, step, monitor) -> dict`` and
    ``sample(n, generator, y) -> (n, C, H, W)``. Every model takes the images' labels ``y``
    (B,) beside the images, in one signature; a model that does not need them ignores them
    (``y=None`` is fine), and one that does sets :attr:`needs_labels` and conditions its
    encoder and decoder through :meth:`encoder_input` and :meth:`decoder_input`.

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
    #: Whether the model needs the class labels of its images (``y``), and so the number of
    #: classes (``num_classes``, from the data, given at build time as ``image_shape`` is).
    needs_labels: bool = False
    #: Whether codes are grids of indices into a codebook (VQ-VAE: ``encode`` gives (B, h, w)
    #: integers) rather than vectors, sampled through a prior over code grids fitted after
    #: training (:mod:`vae_experiments.models.code_priors`) rather than a density over vectors.
    discrete_codes: bool = False

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

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        step: int | None = None,
        monitor: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Named scalar terms of a batch x (B, C, H, W) with labels y, each averaged over the
        batch; ``"loss"`` is what training minimises, at optimiser step ``step`` (None in
        evaluation). ``monitor=False`` is a training step whose terms nobody logs: a model may
        then leave out the terms that only describe training (``recon_mse``, ``elbo``) and
        skip their arithmetic, but ``"loss"`` must be the same bit for bit."""
        raise NotImplementedError

    def sample(
        self, n: int, generator: torch.Generator | None = None, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def encoder_input(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """What the encoder takes for images x (B, C, H, W) with labels y (B,): the images
        themselves; a conditional model adds its condition."""
        return x

    def decoder_input(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """What the decoder takes for latents z (B, latent_dim) with labels y (B,): z itself;
        a conditional model appends its condition."""
        return z

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Latent codes (B, latent_dim) (and labels (B,)) -> images (B, C, H, W) in data space."""
        return self.likelihood.mean(self.decoder(self.decoder_input(z, y)))

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Deterministic reconstruction ``decode(encode(x, y), y)`` of images (B, C, H, W)."""
        return self.decode(self.encode(x, y), y)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
