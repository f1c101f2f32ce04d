"""Observation models: turn a decoder output into log p(x | z) and a reconstruction.

Each likelihood takes the decoder's raw output (B, C, H, W) and returns per-image values (B,),
summed over pixels, so a VAE's ELBO is a per-datapoint bound in nats.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Likelihood(nn.Module):
    """Interface: ``log_prob(x, output) -> (B,)`` and ``mean(output) -> (B, C, H, W)``."""

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

    def __init__(self, sigma: float, learn_sigma: bool):
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"model.sigma must be > 0, got {sigma}")
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


class SquaredError(Likelihood):
    """The classic autoencoder loss: ``log_prob`` is minus the squared error summed over pixels.

    Not a normalised density (it is a Gaussian with sigma^2 = 1/2 up to a constant); used by the
    deterministic autoencoders, whose ``recon`` is then exactly ``recon_mse``.
    """

    def log_prob(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return -(x - output).square().flatten(1).sum(1)

    def mean(self, output: torch.Tensor) -> torch.Tensor:
        return output


LIKELIHOODS = ("bernoulli", "gaussian")
RECON_LOSSES = ("mse", "bce")


def build_likelihood(
    name: str, sigma: float | None = None, learn_sigma: bool = False
) -> Likelihood:
    """Maps ``model.likelihood`` (VAE) or ``model.recon_loss`` (AE) to a likelihood module."""
    if name == "bernoulli" or name == "bce":
        return Bernoulli()
    if name == "gaussian":
        if sigma is None:
            raise ValueError("model.likelihood=gaussian needs model.sigma")
        return Gaussian(sigma, learn_sigma)
    if name == "mse":
        return SquaredError()
    raise ValueError(
        f"unknown likelihood {name!r}; model.likelihood takes {', '.join(LIKELIHOODS)} and "
        f"model.recon_loss takes {', '.join(RECON_LOSSES)}"
    )
