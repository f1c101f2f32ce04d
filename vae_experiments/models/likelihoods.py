"""Observation models: turn a decoder output into log p(x | z) and a reconstruction.

Each likelihood takes the decoder's raw output (B, C, H, W) and returns per-image values (B,),
summed over pixels, so a VAE's ELBO is a per-datapoint bound in nats.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from vae_experiments.targets import ConfigError

log = logging.getLogger(__name__)


class Likelihood(nn.Module):
    """Interface: ``log_prob(x, output) -> (B,)`` and ``mean(output) -> (B, C, H, W)``."""

    #: Whether ``log_prob`` is a density over continuous pixel values (then bits per dimension
    #: on 8-bit data get the discretisation term) rather than a probability of discrete values.
    continuous_density: bool = False

    def log_prob(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mean(self, output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Bernoulli(Likelihood):
    """Independent Bernoulli pixels parameterised by logits; x in [0, 1] (binary or grey)."""

    def log_prob(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(output, x, reduction="none")
        return -bce.flatten(1).sum(1)

    def mean(self, output: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(output)


class Gaussian(Likelihood):
    """Independent Gaussian pixels with mean = decoder output and one shared sigma.

    A learned sigma is bounded below by ``min_sigma``: on data the decoder can reconstruct
    exactly (constant images, say) the likelihood grows without bound as sigma shrinks, and the
    "ELBO" with it. The bound caps ``log_prob`` at ``-log(min_sigma * sqrt(2 pi))`` nats per
    pixel (5.30 for the default 0.002, below the log 256 = 5.55 nats of one 1/256-wide bin of
    8-bit pixels in [0, 1], so bits per dimension stay >= 0). It is a soft clamp on log(sigma),
    as in the sigma-VAE's code: ``log_sigma_used = log(min_sigma) + softplus(log_sigma -
    log(min_sigma))`` with sharpness :data:`BOUND_SHARPNESS`: sigma as learned within 0.01% from
    2 * min_sigma up and exactly from e**2 * min_sigma up (0.015 for the default), above
    ``min_sigma`` everywhere, and with a gradient everywhere. The parameter (the state-dict key
    ``log_sigma``) still holds log(sigma), so the weights of earlier runs load as they are.

    Args:
        sigma: the standard deviation, or its starting value when ``learn_sigma`` is true.
        learn_sigma: learn log(sigma) as a parameter (a single scalar, as in the sigma-VAE,
            https://arxiv.org/abs/2006.13202).
        min_sigma: the lower bound of a learned sigma (> 0, and <= ``sigma``); a fixed sigma is
            used as given.
    """

    continuous_density = True

    #: How sharply the learned log(sigma) turns into the bound (softplus's ``beta``): at the bound
    #: itself the sigma used is min_sigma * 2 ** (1 / BOUND_SHARPNESS), 7% above it.
    BOUND_SHARPNESS = 10.0

    # min_sigma has a default here only so that the config.yaml of a run trained before the key
    # existed still builds (load_run, evaluate, resume); configs/model/likelihood/gaussian.yaml
    # gives it for every new run.
    def __init__(self, sigma: float, learn_sigma: bool, min_sigma: float = 0.002):
        super().__init__()
        if not sigma > 0:
            raise ConfigError("sigma", sigma, "must be a number > 0")
        if not min_sigma > 0:
            raise ConfigError("min_sigma", min_sigma, "must be a number > 0")
        if learn_sigma and sigma < min_sigma:
            raise ConfigError(
                "sigma",
                sigma,
                f"must be >= min_sigma={min_sigma} (the lower bound of a learned sigma): "
                "raise sigma or lower min_sigma",
            )
        self.learn_sigma = learn_sigma
        self.min_sigma = min_sigma
        log_sigma = torch.tensor(math.log(sigma))
        if learn_sigma:
            self.log_sigma = nn.Parameter(log_sigma)
            log.info(
                "Gaussian likelihood: sigma learned from %g, bounded below by min_sigma=%g "
                "(log p(x) at most %.2f nats per pixel)",
                sigma,
                min_sigma,
                -math.log(min_sigma * math.sqrt(2 * math.pi)),
            )
        else:
            self.register_buffer("log_sigma", log_sigma)

    def bounded_log_sigma(self) -> torch.Tensor:
        """log(sigma) as the likelihood uses it: a learned one softly clamped at log(min_sigma)."""
        if not self.learn_sigma:
            return self.log_sigma
        log_min = math.log(self.min_sigma)
        excess = F.softplus(self.log_sigma - log_min, beta=self.BOUND_SHARPNESS)
        return log_min + excess

    @property
    def sigma(self) -> torch.Tensor:
        """The standard deviation used (scalar), bound applied."""
        return self.bounded_log_sigma().exp()

    def log_prob(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        log_sigma = self.bounded_log_sigma()
        squared_error = (x - output).square().flatten(1).sum(1)
        num_pixels = x[0].numel()
        normaliser = num_pixels * (log_sigma + 0.5 * math.log(2 * math.pi))
        return -0.5 * squared_error * torch.exp(-2 * log_sigma) - normaliser

    def mean(self, output: torch.Tensor) -> torch.Tensor:
        return output


class Laplace(Likelihood):
    """Independent Laplace pixels around the decoder output with a fixed scale ``b``.

    ``log_prob`` is minus the absolute error (L1) divided by ``b``, plus the normaliser
    ``-log(2 b)`` per pixel, summed over pixels: (B,) nats per image.

    Args:
        b: the scale (mean absolute deviation) of every pixel.
    """

    continuous_density = True

    def __init__(self, b: float):
        super().__init__()
        if not b > 0:
            raise ConfigError("b", b, "must be a number > 0")
        self.b = b

    def log_prob(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return -((x - output).abs() / self.b + math.log(2 * self.b)).flatten(1).sum(1)

    def mean(self, output: torch.Tensor) -> torch.Tensor:
        return output


class SquaredError(Likelihood):
    """The classic autoencoder loss: ``log_prob`` is minus the squared error summed over pixels.

    Not a normalised density (it is a Gaussian with sigma^2 = 1/2 up to a constant); used by the
    deterministic autoencoders, whose ``recon`` is then exactly ``recon_mse``.
    """

    def log_prob(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return -(x - output).square().flatten(1).sum(1)

    def mean(self, output: torch.Tensor) -> torch.Tensor:
        return output
