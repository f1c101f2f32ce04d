"""The latent densities against computations that share no code with torch.distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.mixture import GaussianMixture as SklearnGaussianMixture

from vae_experiments.analysis.latent import (
    DiagonalGaussian,
    GaussianMixture,
    LatentDensity,
    StandardNormal,
)


def random_codes(n: int, seed: int) -> torch.Tensor:
    """Codes (n, 4) in two correlated, offset clusters."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(4, 4, generator=generator)
    codes = torch.randn(n, 4, generator=generator, dtype=torch.float64) @ mixing.double()
    codes[: n // 3] += 4.0
    return codes


def scipy_standard_normal(codes: np.ndarray, z: np.ndarray) -> np.ndarray:
    return multivariate_normal(np.zeros(codes.shape[1]), np.eye(codes.shape[1])).logpdf(z)


def scipy_diagonal_gaussian(codes: np.ndarray, z: np.ndarray) -> np.ndarray:
    return multivariate_normal(codes.mean(0), np.diag(codes.var(0))).logpdf(z)


def scipy_gaussian_mixture(codes: np.ndarray, z: np.ndarray) -> np.ndarray:
    # The same EM as GaussianMixture(components=3, seed=0), scored by scipy term by term.
    reg_covar = 1e-6 * codes.var(0).mean()
    fitted = SklearnGaussianMixture(3, random_state=0, reg_covar=reg_covar).fit(codes)
    parameters = zip(fitted.weights_, fitted.means_, fitted.covariances_, strict=True)
    terms = [np.log(w) + multivariate_normal(mean, cov).logpdf(z) for w, mean, cov in parameters]
    expected = logsumexp(np.stack(terms), axis=0)
    np.testing.assert_allclose(fitted.score_samples(z), expected, rtol=1e-10)
    return expected


CASES = {
    "standard_normal": (lambda: StandardNormal(4), scipy_standard_normal),
    "diag_gaussian": (DiagonalGaussian, scipy_diagonal_gaussian),
    "gmm": (lambda: GaussianMixture(components=3, seed=0), scipy_gaussian_mixture),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", CASES)
def test_log_prob_matches_scipy(name, dtype):
    make, reference = CASES[name]
    codes, z = random_codes(1200, 0), random_codes(300, 1) * 1.5
    density = make().fit(codes.to(dtype))
    expected = reference(codes.to(dtype).double().numpy(), z.to(dtype).double().numpy())
    log_prob = density.log_prob(z.to(dtype))
    assert log_prob.shape == (300,) and log_prob.dtype == dtype
    tolerance = 1e-9 if dtype == torch.float64 else 1e-4
    np.testing.assert_allclose(log_prob.double().numpy(), expected, rtol=tolerance)


def test_seeded_draws_transform_the_generators_noise():
    """sample(n, generator) draws its noise from the generator alone: the same draws as the
    formulas below, and the global RNG is left as it was."""
    codes = random_codes(1200, 0).float()
    n = 500

    def generator() -> torch.Generator:
        return torch.Generator().manual_seed(7)

    state = torch.get_rng_state()
    prior, diag, gmm = (make().fit(codes) for make, _ in CASES.values())
    draws = [density.sample(n, generator()) for density in (prior, diag, gmm)]
    assert torch.equal(torch.get_rng_state(), state)

    eps = torch.randn(n, 4, generator=generator())
    torch.testing.assert_close(draws[0], eps, rtol=0, atol=0)
    expected_diag = codes.mean(0) + codes.var(0, correction=0).sqrt() * eps
    torch.testing.assert_close(draws[1], expected_diag)

    g = generator()  # a component index per draw, then the noise
    component = torch.multinomial(gmm.log_weights.exp(), n, replacement=True, generator=g)
    eps = torch.randn(n, 4, generator=g, dtype=torch.float64)
    tril = gmm.scale_tril[component]
    expected_gmm = gmm.means[component] + torch.einsum("nij,nj->ni", tril, eps)
    assert draws[2].dtype == torch.float32
    torch.testing.assert_close(draws[2], expected_gmm.float())


@pytest.mark.parametrize("density", [DiagonalGaussian(), GaussianMixture(2)], ids=type)
def test_unfitted_densities_say_so(density: LatentDensity):
    with pytest.raises(RuntimeError, match="not fitted: call fit"):
        density.log_prob(torch.zeros(3, 2))
    with pytest.raises(RuntimeError, match="not fitted: call fit"):
        density.sample(3)
