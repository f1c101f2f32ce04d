"""The VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning",
https://arxiv.org/abs/1711.00937): a conv encoder to a grid of vectors, each replaced by its
nearest code of a learned codebook, and a decoder from the codes' vectors; sampled through a
prior over code grids fitted after training (:mod:`vae_experiments.models.code_priors`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vae_experiments.models.base import LatentModel, squared_error
from vae_experiments.models.code_priors import CodePrior, PriorRecipe
from vae_experiments.models.likelihoods import Likelihood
from vae_experiments.models.networks import Network
from vae_experiments.models.quantizer import VectorQuantizer
from vae_experiments.targets import ConfigError


class _GridBody(Network):
    """``network``'s grid encoder and decoder (:meth:`Network.grid_encoder`), as
    :class:`LatentModel` builds a body's ``encoder`` and ``decoder``."""

    def __init__(self, network: Network, min_size: int):
        self.network = network
        self.min_size = min_size

    def encoder(self, image_shape: Sequence[int], out_features: int) -> nn.Module:
        return self.network.grid_encoder(image_shape, out_features, self.min_size)

    def decoder(self, image_shape: Sequence[int], latent_dim: int) -> nn.Module:
        return self.network.grid_decoder(image_shape, latent_dim, self.min_size)


class VQVAE(LatentModel):
    """x -> encoder -> z_e (B, D, h, w) -> nearest codes -> decoder -> p(x | z_q).

    The loss per image (van den Oord et al. 2017, eq. 3) is::

        recon + codebook + commitment_weight * commitment
        recon      = -log p(x | z_q)       summed over pixels (the likelihood's)
        codebook   = ||sg[z_e] - z_q||^2   summed over grid positions and code dims
        commitment = ||z_e - sg[z_q]||^2   the same sum

    with gradients passed straight through the quantisation (:class:`VectorQuantizer`). With
    ``ema_decay`` the codebook follows moving averages of its encodings instead, and
    ``codebook`` leaves the loss (it is still logged: the distance the averages reduce).

    A code is an index, so ``encode`` gives grids of indices (B, h, w) and ``decode`` takes them;
    ``sample`` decodes draws from :attr:`code_prior`, a prior over such grids fitted after
    training (its second stage) and attached with :meth:`set_code_prior` (``load_run`` attaches
    a run's ``prior.pt``). The prior is not a submodule: the model's weights and checkpoints
    are the first stage's alone.

    Args:
        image_shape: (C, H, W) of the data; the trainer passes the data module's.
        latent_dim: D, the size of each code vector.
        num_codes: K, the codebook size (>= 2).
        network: a body with a spatial grid (``conv``): stride-2 blocks down to the grid, as
            many as its channels give while both sides stay >= ``min_grid_size``.
        likelihood: p(x | z_q) given the decoder output.
        prior: the recipe of the prior over code grids (:class:`PriorRecipe`), checked against
            the grid here and used after training.
        commitment_weight: the paper's beta (0.25).
        ema_decay: null, or the decay of the EMA codebook updates (0.99).
        dead_code_steps: restart a code unused for this many training steps at a recent
            encoder output (null: never).
        min_grid_size: the smallest height and width of the code grid (28x28 images give 7x7
            with two blocks, 8x8 digits 4x4 with one).
    """

    discrete_codes = True

    def __init__(
        self,
        image_shape: Sequence[int],
        latent_dim: int,
        num_codes: int,
        network: Network,
        likelihood: Likelihood,
        prior: PriorRecipe,
        commitment_weight: float,
        ema_decay: float | None,
        dead_code_steps: int | None,
        min_grid_size: int,
    ):
        if min_grid_size < 1:
            raise ConfigError("min_grid_size", min_grid_size, "must be an integer >= 1")
        if commitment_weight < 0:
            raise ConfigError("commitment_weight", commitment_weight, "must be a number >= 0")
        if not isinstance(prior, PriorRecipe):
            raise ConfigError(
                "prior",
                type(prior).__name__,
                "must be a prior over code grids (model/prior=pixelcnn or frequencies)",
            )
        super().__init__(
            image_shape, latent_dim, _GridBody(network, min_grid_size), likelihood, latent_dim
        )
        self.grid_shape: tuple[int, int] = tuple(self.encoder.grid_shape)
        self.num_codes = num_codes
        self.commitment_weight = commitment_weight
        self.quantizer = VectorQuantizer(num_codes, latent_dim, ema_decay, dead_code_steps)
        try:  # a grid too small for the prior fails now, not after training
            prior.check(self.grid_shape, num_codes)
        except ConfigError as error:
            raise error.under("prior") from None
        self.prior_recipe = prior
        self.__dict__["_code_prior"] = None  # not a submodule: see the class docstring

    @property
    def code_prior(self) -> CodePrior | None:
        """The fitted prior over code grids that :meth:`sample` draws from, or None."""
        return self.__dict__["_code_prior"]

    def set_code_prior(self, prior: CodePrior | None) -> None:
        """Attaches a prior fitted to this model's codes (None detaches it).

        Raises:
            ValueError: the prior is for another grid or codebook size.
        """
        if prior is not None and (
            tuple(prior.grid_shape) != self.grid_shape or prior.num_codes != self.num_codes
        ):
            raise ValueError(
                f"a prior over {prior.grid_shape[0]}x{prior.grid_shape[1]} grids of "
                f"{prior.num_codes} codes does not fit this VQ-VAE's {self.grid_shape[0]}x"
                f"{self.grid_shape[1]} grids of {self.num_codes} codes"
            )
        self.__dict__["_code_prior"] = prior

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The nearest code of each grid position: images (B, C, H, W) -> (B, h, w) int64; the
        labels y are not used."""
        return self.quantizer.nearest(self._grid(self.encoder(x))).view(-1, *self.grid_shape)

    @staticmethod
    def _grid(z_e: torch.Tensor) -> torch.Tensor:
        """Encoder outputs (B, D, h, w) as rows (B*h*w, D), one per grid position."""
        return z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Code grids (B, h, w) of indices -> reconstructed images (B, C, H, W); the labels y
        are not used."""
        return self.likelihood.mean(self.decoder(self.quantizer.lookup(z)))

    def loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        step: int | None = None,
        monitor: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Loss terms for a batch x (B, C, H, W); per image, averaged over the batch.

        ``loss`` is the class docstring's sum; ``recon`` (nats per image for a likelihood),
        ``codebook`` and ``commitment`` (unweighted) are its terms, ``recon_mse`` the squared
        error of the reconstruction; ``perplexity`` (exp of the entropy of the batch's code
        histogram) and ``codes_in_use`` (codes chosen at least once) describe the batch's use
        of the codebook, and are averaged over batches like the other terms. In training mode
        the codebook's own updates (EMA, dead-code restarts) happen here too. ``monitor=False``
        leaves ``recon_mse`` out. The labels ``y`` and ``step`` are unused; they keep the
        signature common to all models.
        """
        quantized = self.quantizer(self.encoder(x))
        output = self.decoder(quantized.straight_through)
        recon = -self.likelihood.log_prob(x, output)  # (B,)
        loss = recon + self.commitment_weight * quantized.commitment_loss
        if self.quantizer.ema_decay is None:
            loss = loss + quantized.codebook_loss
        terms = {"loss": loss.mean(), "recon": recon.mean()}
        if monitor:
            terms["recon_mse"] = squared_error(x, self.likelihood.mean(output).detach()).mean()
        return {
            **terms,
            "codebook": quantized.codebook_loss.detach().mean(),
            "commitment": quantized.commitment_loss.detach().mean(),
            "perplexity": quantized.perplexity,
            "codes_in_use": quantized.codes_in_use,
        }

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decodes n code grids drawn from :attr:`code_prior`: images (n, C, H, W); ``y`` is not
        used (the prior is not conditioned on labels).

        Raises:
            RuntimeError: no prior is attached.
        """
        prior = self.code_prior
        if prior is None:
            raise RuntimeError(
                "this VQ-VAE has no prior over its codes to sample from: training fits one at "
                "its end (callbacks.latent_samples.enabled=true), python scripts/fit_prior.py "
                "run=<run dir> fits one later, and load_run attaches it"
            )
        return self.decode(prior.to(self.device).sample(n, generator=generator))
