"""Densities over latent codes: sample from an autoencoder, and see how well a density fits.

A deterministic autoencoder has no prior to sample from. Fit a density to the training set's
codes and decode draws from it: the factored Gaussian (:class:`DiagonalGaussian`, per-dimension
mean and variance) is the simplest choice, a full-covariance Gaussian mixture
(:class:`GaussianMixture`) follows the codes' clusters and correlations. The held-out
log-likelihood of the test codes under each (:func:`heldout_log_likelihood`) says which fits the
codes better; decoding draws from the worse fit gives implausible images. The same applies to a
VAE's aggregate posterior (the codes of a VAE are its posterior means), where it can be set
beside the prior the VAE was trained with (:class:`StandardNormal`).

Plain PyTorch (+ scikit-learn to fit the mixture), so it works in a notebook::

    codes = encode_split(model, (x for x, _ in iterate_split(dm, "train")))
    density = fit_density("gmm", codes, components=10)
    images = model.decode(density.sample(64))
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.distributions import (
    Categorical,
    Distribution,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

from vae_experiments.models import LatentModel

DENSITIES = ("diag_gaussian", "gmm")


@torch.no_grad()
def encode_split(
    model: LatentModel,
    batches: Iterable[Tensor | Sequence[Tensor]],
    return_labels: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Codes of every image in ``batches``, in order: ``model.encode`` (a VAE's posterior mean;
    a conditional model's given the images' labels).

    Args:
        model: any :class:`LatentModel`; evaluated in eval mode (its mode is restored after).
        batches: float image batches (B, C, H, W), or ``(images, labels)`` pairs as yielded by
            :func:`vae_experiments.runs.iterate_split` (which a conditional model needs). Moved
            to the model's device.
        return_labels: also return the labels (needs ``(images, labels)`` pairs).

    Returns:
        Codes (N, latent_dim) on the model's device; with ``return_labels``, also labels (N,)
        (or (N, F): factors).
    """
    was_training = model.training
    model.eval()
    codes, labels = [], []
    try:
        for batch in batches:
            if isinstance(batch, Tensor):
                images, batch_labels = batch, None
            else:
                images, batch_labels = batch[0], batch[1] if len(batch) > 1 else None
            y = None if batch_labels is None else batch_labels.to(model.device)
            codes.append(model.encode(images.to(model.device), y))
            if return_labels:
                if batch_labels is None:
                    raise ValueError("return_labels=True needs (images, labels) batches")
                labels.append(batch_labels)
    finally:
        model.train(was_training)
    if not codes:
        raise ValueError("encode_split got no batches: is the split empty?")
    if return_labels:
        return torch.cat(codes), torch.cat(labels)
    return torch.cat(codes)


def _check_codes(codes: Tensor, minimum: int, what: str) -> None:
    if codes.ndim != 2:
        raise ValueError(f"codes must have shape (N, latent_dim), got {tuple(codes.shape)}")
    if codes.shape[0] < minimum:
        raise ValueError(f"{what} needs at least {minimum} codes, got {codes.shape[0]}")
    if not torch.isfinite(codes).all():
        raise ValueError("codes contain NaN or inf: is the model's checkpoint broken?")


def _standard_normal(n: int, dim: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """N(0, I) draws (n, dim) in ``like``'s dtype and device, drawn with ``generator``'s device.

    torch.distributions' ``sample()`` draws from the global RNG and takes no generator; the
    densities draw this noise with the caller's generator instead and transform it as their
    distribution's ``rsample`` would, so seeded draws repeat and leave the global RNG alone.
    """
    device = generator.device if generator is not None else like.device
    eps = torch.randn(n, dim, generator=generator, device=device, dtype=like.dtype)
    return eps.to(like.device)


class LatentDensity:
    """A density over codes: ``fit(codes)``, ``log_prob(z)`` in nats, ``sample(n)``.

    ``fit`` sets ``distribution``, a :class:`torch.distributions.Distribution` with event shape
    (D,) that ``log_prob`` evaluates.
    """

    distribution: Distribution | None = None

    def fit(self, codes: Tensor) -> LatentDensity:
        raise NotImplementedError

    def _fitted(self) -> Distribution:
        if self.distribution is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(codes) first")
        return self.distribution

    def log_prob(self, z: Tensor) -> Tensor:
        """Log-density (N,) in nats of codes z (N, D)."""
        return self._fitted().log_prob(z)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws (n, D) on the device of the codes it was fitted to."""
        raise NotImplementedError


def _factored_normal(loc: Tensor, scale: Tensor) -> Independent:
    """N(loc, diag(scale^2)) over vectors: loc and scale (D,), event shape (D,)."""
    return Independent(Normal(loc, scale), 1)


class _FactoredNormal(LatentDensity):
    """A density whose ``distribution`` is a :func:`_factored_normal`."""

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        normal = self._fitted().base_dist
        eps = _standard_normal(n, normal.loc.shape[0], generator, normal.loc)
        return normal.loc + normal.scale * eps  # as Normal.rsample


class StandardNormal(_FactoredNormal):
    """N(0, I): the prior of a VAE, for comparison with densities fitted to its codes."""

    def __init__(self, dim: int, device: str | torch.device = "cpu"):
        self.distribution = self._standard(torch.zeros(dim, device=device))

    @staticmethod
    def _standard(loc: Tensor) -> Independent:
        return _factored_normal(loc, torch.ones_like(loc))

    @property
    def loc(self) -> Tensor:
        """The zero mean (D,), in the dtype and on the device of the codes it was fitted to."""
        return self._fitted().base_dist.loc

    def fit(self, codes: Tensor) -> StandardNormal:
        """Nothing to fit: only moves to the codes' dtype and device."""
        _check_codes(codes, 1, "StandardNormal")
        self.distribution = self._standard(
            torch.zeros(codes.shape[1], dtype=codes.dtype, device=codes.device)
        )
        return self


class DiagonalGaussian(_FactoredNormal):
    """The factored Gaussian: each dimension's mean and variance, fitted by maximum likelihood.

    Ignores every correlation between dimensions and every cluster in the codes.

    Args:
        min_variance: floor on each variance, relative to the mean variance over dimensions, so a
            collapsed (constant) dimension does not give an infinite density.
    """

    def __init__(self, min_variance: float = 1e-6):
        self.min_variance = min_variance

    @property
    def mean(self) -> Tensor:
        """Per-dimension mean (D,)."""
        return self._fitted().mean

    @property
    def variance(self) -> Tensor:
        """Per-dimension variance (D,), floored by ``min_variance``."""
        return self._fitted().variance

    def fit(self, codes: Tensor) -> DiagonalGaussian:
        """Sets mean and variance (D,) to the codes' (N, D) sample mean and (biased) variance."""
        _check_codes(codes, 2, "DiagonalGaussian")
        codes = codes.detach()
        variance = codes.var(0, correction=0)
        variance = variance.clamp_min(self.min_variance * variance.mean().clamp_min(1e-30))
        self.distribution = _factored_normal(codes.mean(0), variance.sqrt())
        return self


class GaussianMixture(LatentDensity):
    """A mixture of ``components`` full-covariance Gaussians, fitted by EM (scikit-learn).

    ``log_prob`` and ``sample`` are torch (float64 inside) on the codes' device.

    Args:
        components: number of mixture components.
        seed: seeds the k-means initialisation of EM.
        reg_covar: added to each covariance's diagonal, relative to the codes' mean variance
            (scikit-learn's ``reg_covar`` is absolute; codes of AEs have any scale).
        max_iter: EM iterations at most.
    """

    def __init__(
        self, components: int = 10, seed: int = 0, reg_covar: float = 1e-6, max_iter: int = 200
    ):
        if components < 1:
            raise ValueError(f"components must be >= 1, got {components}")
        self.components = components
        self.seed = seed
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.reg_covar_: float | None = None  # the absolute value passed to scikit-learn
        self.converged_: bool | None = None
        self._dtype = torch.float32  # of the codes it was fitted to; log_prob and sample return it

    @property
    def log_weights(self) -> Tensor:
        """Log mixture weights (K,), float64."""
        return self._fitted().mixture_distribution.logits

    @property
    def means(self) -> Tensor:
        """Component means (K, D), float64."""
        return self._fitted().component_distribution.loc

    @property
    def scale_tril(self) -> Tensor:
        """Cholesky factors (K, D, D) of the component covariances, float64."""
        return self._fitted().component_distribution.scale_tril

    def fit(self, codes: Tensor) -> GaussianMixture:
        """Fits the mixture to codes (N, D); needs N >= components."""
        from sklearn.mixture import GaussianMixture as SklearnGaussianMixture

        _check_codes(codes, self.components, f"a GaussianMixture with {self.components} components")
        data = codes.detach().double().cpu().numpy()
        self.reg_covar_ = float(self.reg_covar * max(data.var(0).mean(), 1e-30))
        mixture = SklearnGaussianMixture(
            n_components=self.components,
            covariance_type="full",
            reg_covar=self.reg_covar_,
            max_iter=self.max_iter,
            random_state=self.seed,
        ).fit(data)
        self.converged_ = bool(mixture.converged_)

        def as_tensor(array: np.ndarray) -> Tensor:
            return torch.as_tensor(np.asarray(array), dtype=torch.float64).to(codes.device)

        # float64, as scikit-learn fitted it: log_prob then matches its score_samples, also for
        # the nearly singular covariances of codes that lie on a lower-dimensional set.
        self.distribution = MixtureSameFamily(
            Categorical(probs=as_tensor(mixture.weights_)),
            MultivariateNormal(
                as_tensor(mixture.means_),
                scale_tril=torch.linalg.cholesky(as_tensor(mixture.covariances_)),
            ),
        )
        self._dtype = codes.dtype
        return self

    def log_prob(self, z: Tensor, chunk_size: int = 4096) -> Tensor:
        """Log-density (N,) in nats of codes z (N, D), in the codes' dtype.

        Evaluated in chunks of ``chunk_size`` codes: each chunk holds (chunk, K, D) differences.
        """
        mixture = self._fitted()
        chunks = z.detach().to(torch.float64).split(chunk_size)
        return torch.cat([mixture.log_prob(chunk) for chunk in chunks]).to(self._dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        mixture = self._fitted()
        weights = mixture.mixture_distribution.probs  # (K,)
        gaussians = mixture.component_distribution
        means, scale_tril = gaussians.loc, gaussians.scale_tril  # (K, D), (K, D, D)
        device = generator.device if generator is not None else means.device
        component = torch.multinomial(weights.to(device), n, replacement=True, generator=generator)
        eps = _standard_normal(n, means.shape[1], generator, means)  # (n, D) float64
        component = component.to(means.device)
        # loc + L eps, as MultivariateNormal.rsample, with each draw's component
        z = means[component] + (scale_tril[component] @ eps.unsqueeze(-1)).squeeze(-1)
        return z.to(self._dtype)


def fit_density(kind: str, codes: Tensor, components: int = 10, seed: int = 0) -> LatentDensity:
    """Fits ``diag_gaussian`` (per-dimension mean and variance) or ``gmm`` (a full-covariance
    mixture of ``components`` Gaussians, EM seeded with ``seed``) to codes (N, D)."""
    if kind == "diag_gaussian":
        return DiagonalGaussian().fit(codes)
    if kind == "gmm":
        if codes.shape[0] < components:
            raise ValueError(
                f"a gmm with components={components} needs at least {components} codes, got "
                f"{codes.shape[0]}; lower components or encode more images"
            )
        return GaussianMixture(components=components, seed=seed).fit(codes)
    raise ValueError(f"unknown density {kind!r}; choose one of: {', '.join(DENSITIES)}")


class DecodedDensity:
    """A generator made of a model's decoder and a density over its codes: how an autoencoder
    (which has no prior) samples. A :class:`~vae_experiments.analysis.quality.Sampler`.

    Args:
        model: any :class:`LatentModel`; decoded in eval mode (its mode is restored after).
        density: a fitted :class:`LatentDensity` over the model's codes (:func:`fit_density`).
    """

    def __init__(self, model: LatentModel, density: LatentDensity):
        self.model = model
        self.density = density

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Decodes n draws of the density: images (n, C, H, W) on the model's device."""
        z = self.density.sample(n, generator=generator).to(self.model.device)
        was_training = self.model.training
        self.model.eval()
        try:
            return self.model.decode(z.to(next(self.model.parameters()).dtype))
        finally:
            self.model.train(was_training)


def heldout_log_likelihood(density: LatentDensity, codes: Tensor) -> float:
    """Mean log-density of codes (N, D) not used for fitting, in nats per code."""
    _check_codes(codes, 1, "heldout_log_likelihood")
    return float(density.log_prob(codes).double().mean())


def traversal_codes(
    codes: Tensor, steps: int = 9, dims: Sequence[int] | None = None, quantile: float = 0.05
) -> Tensor:
    """Codes for a latent traversal: (len(dims) * steps, D), row-major by dimension.

    Row ``i`` (``steps`` codes) sets every dimension to the codes' median except ``dims[i]``,
    which goes linearly from its ``quantile`` to its ``1 - quantile`` quantile.
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    dims, (low, center, high) = _traversal_range(codes, dims, quantile)
    dim = codes.shape[1]
    grid = center.repeat(len(dims), steps, 1)  # (rows, steps, D)
    position = torch.linspace(0, 1, steps, device=codes.device)
    for row, d in enumerate(dims):
        grid[row, :, d] = low[d] + (high[d] - low[d]) * position
    return grid.reshape(len(dims) * steps, dim)


def _traversal_range(
    codes: Tensor, dims: Sequence[int] | None, quantile: float
) -> tuple[list[int], Tensor]:
    """The dimensions of a traversal (all by default) and the codes' ``quantile``, median and
    ``1 - quantile`` quantile of every dimension: (3, D)."""
    _check_codes(codes, 1, "traversal_codes")
    dim = codes.shape[1]
    dims = list(range(dim)) if dims is None else list(dims)
    if not dims or any(not 0 <= d < dim for d in dims):
        raise ValueError(
            f"dims must be a non-empty list of latent dimensions in [0, {dim}), got {dims}"
        )
    codes = codes.detach().float()
    levels = torch.tensor([quantile, 0.5, 1 - quantile], device=codes.device)
    # An even N's median is the mean of the middle two, as numpy's.
    return dims, torch.quantile(codes, levels, dim=0)


def traversal_labels(
    codes: Tensor, dims: Sequence[int] | None = None, quantile: float = 0.05
) -> list[str]:
    """One label per row of :func:`traversal_codes`: the dimension and the range it sweeps,
    ``"z3: -1.6 to 1.7"``."""
    dims, (low, _, high) = _traversal_range(codes, dims, quantile)
    return [f"z{d}: {float(low[d]):.2g} to {float(high[d]):.2g}" for d in dims]


@torch.no_grad()
def latent_traversal(
    model: LatentModel,
    codes: Tensor,
    steps: int = 9,
    dims: Sequence[int] | None = None,
    label: int | None = None,
) -> Tensor:
    """Decoded latent traversal: images (len(dims) * steps, C, H, W), ``steps`` per row.

    One row per latent dimension in ``dims`` (all by default): that dimension swept from the
    5% to the 95% quantile of ``codes`` (e.g. the training codes), the others at the codes' median.
    A conditional model decodes every image as class ``label``.
    """
    z = traversal_codes(codes, steps, dims).to(model.device)
    if label is not None:
        return decode_classes(model, z, [label])[0]
    was_training = model.training
    model.eval()
    try:
        return model.decode(z)
    finally:
        model.train(was_training)


@torch.no_grad()
def decode_classes(model: LatentModel, z: Tensor, classes: Sequence[int]) -> list[Tensor]:
    """A conditional model's images of the same codes z (n, latent_dim) in each class: one
    (n, C, H, W) per class of ``classes``, decoded in eval mode (its mode restored after)."""
    was_training = model.training
    model.eval()
    try:
        images = []
        for label in classes:
            y = torch.full((z.shape[0],), int(label), dtype=torch.int64, device=z.device)
            images.append(model.decode(z, y))
        return images
    finally:
        model.train(was_training)
