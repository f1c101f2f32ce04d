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


#: What a likelihood's ``log_prob`` is a log-probability of (:attr:`Likelihood.support`), and
#: what pixels a batch holds (:func:`vae_experiments.analysis.likelihood.pixel_kind`):
#: pixels 0 or 1 (binary or binarised data) ...
BINARY = "binary"
#: ... pixels k / 255 for integers k (8-bit data: 256 levels) ...
EIGHT_BIT = "8-bit"
#: ... or any real value (a density, or data off the 8-bit grid).
CONTINUOUS = "continuous"


class Likelihood(nn.Module):
    """Interface: ``log_prob(x, output) -> (B,)`` and ``mean(output) -> (B, C, H, W)``."""

    #: What ``log_prob`` is normalised over: :data:`BINARY` (a probability of pixels 0 or 1),
    #: :data:`EIGHT_BIT` (a probability of the 256 levels k / 255), :data:`CONTINUOUS` (a density
    #: on real pixel values), or None (not normalised: not a likelihood at all).
    support: str | None = None

    def log_prob(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mean(self, output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Bernoulli(Likelihood):
    """Independent Bernoulli pixels parameterised by logits.

    A likelihood of binary pixels (0 or 1). Grey x in [0, 1] train as a cross-entropy, but
    ``log_prob`` is then no log-probability of the data (evaluate.py says so).
    """

    support = BINARY

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

    support = CONTINUOUS

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

    support = CONTINUOUS

    def __init__(self, b: float):
        super().__init__()
        if not b > 0:
            raise ConfigError("b", b, "must be a number > 0")
        self.b = b

    def log_prob(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return -((x - output).abs() / self.b + math.log(2 * self.b)).flatten(1).sum(1)

    def mean(self, output: torch.Tensor) -> torch.Tensor:
        return output


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(d)) for d <= 0, accurate at both ends (Maechler 2012)."""
    return torch.where(d > -math.log(2), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


def _log_sigmoid_difference(upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(upper) - sigmoid(lower)) for upper > lower, without cancellation.

    Where both are large and positive the two sigmoids are both near 1; the same difference is
    then taken as sigmoid(-lower) - sigmoid(-upper), whose terms are small.
    """
    flip = (upper + lower) > 0
    upper, lower = torch.where(flip, -lower, upper), torch.where(flip, -upper, lower)
    log_upper = F.logsigmoid(upper)
    return log_upper + _log1mexp(F.logsigmoid(lower) - log_upper)


class DiscretizedLogistic(Likelihood):
    """Independent logistic pixels around the decoder output, discretised to the 256 levels of
    8-bit data: a probability of each level, summing to 1 over the levels.

    Pixel value ``x = k / 255`` (k = 0..255) gets the logistic's mass on the bin ``[x - 1/510,
    x + 1/510]``, the first and last bins reaching out to -inf and +inf (Salimans et al. 2017,
    PixelCNN++, https://arxiv.org/abs/1701.05517, with one component and one scale). So
    ``log_prob`` (B,) is a log-likelihood of the 8-bit image in nats, at most 0, and bits per
    dimension are those the literature reports for 8-bit images. On binarised data (pixels 0
    or 255) it is still a likelihood, over 256 levels.

    Args:
        scale: the logistic's scale s (std = s pi / sqrt(3)), or its starting value when
            ``learn_scale`` is true.
        learn_scale: learn log(scale) as one parameter shared by every pixel (the
            sigma-VAE's choice for a Gaussian, https://arxiv.org/abs/2006.13202). Needs no lower
            bound: a probability of discrete values cannot exceed 1.
    """

    support = EIGHT_BIT
    #: Levels of 8-bit pixels; the data are ``k / (LEVELS - 1)``.
    LEVELS = 256

    def __init__(self, scale: float, learn_scale: bool):
        super().__init__()
        if not scale > 0:
            raise ConfigError("scale", scale, "must be a number > 0")
        self.learn_scale = learn_scale
        log_scale = torch.tensor(math.log(scale))
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @property
    def scale(self) -> torch.Tensor:
        """The logistic's scale s (scalar)."""
        return self.log_scale.exp()

    def log_prob(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        half_bin = 0.5 / (self.LEVELS - 1)
        inverse_scale = torch.exp(-self.log_scale)
        centred = x - output
        upper = (centred + half_bin) * inverse_scale  # the bin's edges, standardised
        lower = (centred - half_bin) * inverse_scale
        # The first and last levels take the tails; the middle test picks by value, not by
        # exact equality, so that x = k / 255 in float32 finds its level.
        log_mass = torch.where(
            x < half_bin,
            F.logsigmoid(upper),  # log CDF(upper)
            torch.where(
                x > 1 - half_bin,
                F.logsigmoid(-lower),  # log (1 - CDF(lower))
                _log_sigmoid_difference(upper, lower),
            ),
        )
        return log_mass.flatten(1).sum(1)

    def mean(self, output: torch.Tensor) -> torch.Tensor:
        # The logistic's centre, in the pixel range (the discretised mean up to the mass the
        # end levels take from the tails).
        return output.clamp(0, 1)


class SquaredError(Likelihood):
    """The classic autoencoder loss: ``log_prob`` is minus the squared error summed over pixels.

    Not a normalised density (it is a Gaussian with sigma^2 = 1/2 up to a constant); used by the
    deterministic autoencoders, whose ``recon`` is then exactly ``recon_mse``.
    """

    def log_prob(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return -(x - output).square().flatten(1).sum(1)

    def mean(self, output: torch.Tensor) -> torch.Tensor:
        return output
