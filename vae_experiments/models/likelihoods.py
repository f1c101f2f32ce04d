"""Observation models: turn a decoder output into log p(x | z) and a reconstruction.

Each likelihood takes the decoder's raw output (B, C, H, W) and returns per-image values (B,),
summed over pixels, so a VAE's ELBO is a per-datapoint bound in nats.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vae_experiments.targets import ConfigError


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

    Args:
        sigma: the standard deviation, or its starting value when ``learn_sigma`` is true.
        learn_sigma: learn log(sigma) as a parameter (a single scalar, as in the sigma-VAE,
            https://arxiv.org/abs/2006.13202).
    """

    continuous_density = True

    def __init__(self, sigma: float, learn_sigma: bool):
        super().__init__()
        if not sigma > 0:
            raise ConfigError("sigma", sigma, "must be a number > 0")
        log_sigma = torch.tensor(math.log(sigma))
        if learn_sigma:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)

    @property
    def sigma(self) -> torch.Tensor:
        return self.log_sigma.exp()

    def log_prob(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        squared_error = (x - output).square().flatten(1).sum(1)
        num_pixels = x[0].numel()
        normaliser = num_pixels * (self.log_sigma + 0.5 * math.log(2 * math.pi))
        return -0.5 * squared_error * torch.exp(-2 * self.log_sigma) - normaliser

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
