"""Models: every config builds, shapes are right, and each loss term matches its formula."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from tests.conftest import MODEL_CONFIGS, compose_config, small_model_config
from vae_experiments.models import (
    Bernoulli,
    Gaussian,
    GaussianNoise,
    Masking,
    SquaredError,
    build_autoencoder,
    build_vae,
    gaussian_kl,
)
from vae_experiments.models.base import squared_error

IMAGE_SHAPE = (1, 8, 8)


def build_from_config(name: str, image_shape=IMAGE_SHAPE, overrides=()):
    cfg = compose_config([f"model={name}", "model.latent_dim=3", *overrides])
    return instantiate(
        small_model_config(cfg.model), image_shape=list(image_shape), _convert_="all"
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
@pytest.mark.parametrize("image_shape", [(1, 8, 8), (3, 28, 20)])
def test_every_model_config_builds_and_has_the_interface(name, image_shape):
    model = build_from_config(name, image_shape)
    x = torch.rand(4, *image_shape)
    assert model.encode(x).shape == (4, 3)
    assert model.decode(torch.randn(4, 3)).shape == x.shape
    assert model.reconstruct(x).shape == x.shape
    assert model.sample(5).shape == (5, *image_shape)

    terms = model.loss(x, step=0)
    expected = {"loss", "recon", "recon_mse"} | ({"kl", "elbo"} if model.has_prior else set())
    assert set(terms) == expected
    for value in terms.values():
        assert value.shape == () and torch.isfinite(value)
    terms["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("arch", ["linear", "mlp", "conv"])
def test_archs_are_selectable_for_every_model(arch):
    for name in ["ae", "vae"]:
        model = build_from_config(name, overrides=[f"model.arch={arch}"])
        assert model.reconstruct(torch.rand(2, *IMAGE_SHAPE)).shape == (2, *IMAGE_SHAPE)


def test_default_deep_models_are_convolutional():
    assert type(build_from_config("ae").encoder).__name__ == "ConvEncoder"
    assert type(build_from_config("vae").encoder).__name__ == "ConvEncoder"
    assert type(build_from_config("linear_ae").encoder).__name__ == "MLPEncoder"


# --- likelihoods -------------------------------------------------------------------------------


def test_bernoulli_matches_binary_cross_entropy_summed_over_pixels():
    x = torch.rand(6, 1, 8, 8)
    logits = torch.randn(6, 1, 8, 8)
    expected = torch.stack(
        [-F.binary_cross_entropy(torch.sigmoid(logits[i]), x[i], reduction="sum") for i in range(6)]
    )
    torch.testing.assert_close(Bernoulli().log_prob(x, logits), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sigma", [0.1, 1.0, 2.5])
def test_gaussian_matches_torch_normal(sigma):
    x, mean = torch.rand(6, 3, 4, 5), torch.rand(6, 3, 4, 5)
    expected = torch.distributions.Normal(mean, sigma).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(Gaussian(sigma, learn_sigma=False).log_prob(x, mean), expected)


def test_gaussian_sigma_is_fixed_or_learned():
    fixed, learned = Gaussian(0.5, learn_sigma=False), Gaussian(0.5, learn_sigma=True)
    assert list(fixed.parameters()) == []
    assert [p.shape for p in learned.parameters()] == [torch.Size([])]
    learned.log_prob(torch.rand(2, 1, 2, 2), torch.rand(2, 1, 2, 2)).sum().backward()
    assert learned.log_sigma.grad is not None
    assert math.isclose(float(learned.sigma.detach()), 0.5, rel_tol=1e-6)


def test_squared_error_likelihood_is_minus_the_squared_error():
    x, out = torch.rand(3, 1, 4, 4), torch.rand(3, 1, 4, 4)
    torch.testing.assert_close(SquaredError().log_prob(x, out), -((x - out) ** 2).sum((1, 2, 3)))


# --- VAE ---------------------------------------------------------------------------------------


def test_analytic_kl_matches_monte_carlo():
    generator = torch.Generator().manual_seed(1)
    mu = torch.randn(3, 4, generator=generator)
    logvar = torch.randn(3, 4, generator=generator) * 0.5
    std = torch.exp(0.5 * logvar)
    z = mu + std * torch.randn(200_000, 3, 4, generator=generator)  # (S, B, D)
    log_q = torch.distributions.Normal(mu, std).log_prob(z).sum(-1)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    monte_carlo = (log_q - log_p).mean(0)
    torch.testing.assert_close(gaussian_kl(mu, logvar), monte_carlo, rtol=0.02, atol=0.02)


def test_kl_is_zero_when_posterior_is_prior_and_positive_otherwise():
    assert torch.all(gaussian_kl(torch.zeros(2, 5), torch.zeros(2, 5)) == 0)
    assert torch.all(gaussian_kl(torch.randn(8, 5), torch.randn(8, 5)) > 0)


def test_vae_terms_combine_as_the_elbo():
    model = build_vae(
        IMAGE_SHAPE, 3, "mlp", "bernoulli", beta=4.0, kl_warmup_steps=0, hidden_dims=[16]
    )
    x = torch.rand(8, *IMAGE_SHAPE)
    terms = model.loss(x)
    torch.testing.assert_close(terms["elbo"], -(terms["recon"] + terms["kl"]))
    torch.testing.assert_close(terms["loss"], terms["recon"] + 4.0 * terms["kl"])
    assert terms["kl"] >= 0


def test_vae_recon_is_the_likelihood_at_the_reparameterised_sample():
    model = build_vae(IMAGE_SHAPE, 3, "mlp", "gaussian", 1.0, 0, hidden_dims=[16], sigma=0.3)
    x = torch.rand(5, *IMAGE_SHAPE)
    torch.manual_seed(3)
    terms = model.loss(x)
    torch.manual_seed(3)
    mu, logvar = model.posterior(x)
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    expected = -torch.distributions.Normal(model.decoder(z), 0.3).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(terms["recon"], expected.mean())


def test_kl_warmup_is_linear_then_beta():
    model = build_vae(IMAGE_SHAPE, 2, "linear", "bernoulli", beta=2.0, kl_warmup_steps=10)
    assert model.kl_weight(0) == pytest.approx(0.2)
    assert model.kl_weight(4) == pytest.approx(1.0)
    assert model.kl_weight(9) == pytest.approx(2.0)
    assert model.kl_weight(1000) == pytest.approx(2.0)
    assert model.kl_weight(None) == pytest.approx(2.0)
    x = torch.rand(4, *IMAGE_SHAPE)
    torch.manual_seed(0)
    early = model.loss(x, step=0)
    torch.testing.assert_close(early["loss"], early["recon"] + 0.2 * early["kl"])


def test_vae_eval_recon_mse_uses_the_posterior_mean():
    model = build_vae(IMAGE_SHAPE, 3, "mlp", "bernoulli", 1.0, 0, hidden_dims=[16]).eval()
    x = torch.rand(5, *IMAGE_SHAPE)
    expected = squared_error(x, model.reconstruct(x)).mean()
    torch.testing.assert_close(model.loss(x)["recon_mse"], expected)
    torch.testing.assert_close(model.loss(x)["recon_mse"], expected)  # deterministic in eval


def test_vae_samples_from_the_prior_are_probabilities():
    model = build_vae(IMAGE_SHAPE, 3, "conv", "bernoulli", 1.0, 0, conv_channels=[4, 8]).eval()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    samples = model.sample(7, generator=g1)
    assert samples.shape == (7, *IMAGE_SHAPE)
    assert samples.min() >= 0 and samples.max() <= 1
    torch.testing.assert_close(samples, model.sample(7, generator=g2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta": -1.0}, "model.beta must be >= 0"),
        ({"kl_warmup_steps": -5}, "model.kl_warmup_steps must be >= 0"),
        ({"likelihood": "poisson"}, "bernoulli, gaussian"),
        ({"likelihood": "gaussian", "sigma": 0.0}, "model.sigma must be > 0"),
    ],
)
def test_bad_vae_settings_fail_with_the_key(kwargs, message):
    args = dict(
        image_shape=IMAGE_SHAPE,
        latent_dim=2,
        arch="linear",
        likelihood="bernoulli",
        beta=1.0,
        kl_warmup_steps=0,
        sigma=0.1,
    )
    with pytest.raises(ValueError, match=message):
        build_vae(**{**args, **kwargs})


# --- autoencoders ------------------------------------------------------------------------------


def test_ae_recon_is_the_squared_error_of_the_reconstruction():
    model = build_autoencoder(IMAGE_SHAPE, 3, "mlp", "mse", hidden_dims=[16]).eval()
    x = torch.rand(5, *IMAGE_SHAPE)
    terms = model.loss(x)
    expected = ((model.reconstruct(x) - x) ** 2).sum((1, 2, 3)).mean()
    torch.testing.assert_close(terms["recon"], expected)
    torch.testing.assert_close(terms["recon_mse"], expected)
    assert terms["loss"] is terms["recon"]


def test_ae_with_bce_reports_cross_entropy_and_mse_separately():
    model = build_autoencoder(IMAGE_SHAPE, 3, "mlp", "bce", hidden_dims=[16]).eval()
    x = torch.rand(5, *IMAGE_SHAPE)
    logits = model.decoder(model.encode(x))
    expected = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / 5
    terms = model.loss(x)
    torch.testing.assert_close(terms["recon"], expected)
    torch.testing.assert_close(terms["recon_mse"], squared_error(x, torch.sigmoid(logits)).mean())


@pytest.mark.parametrize("noise", [{"kind": "gaussian", "std": 0.5}, {"kind": "mask", "p": 0.5}])
def test_denoising_corrupts_the_input_in_training_only_and_scores_the_clean_target(noise):
    model = build_autoencoder(IMAGE_SHAPE, 3, "mlp", "mse", hidden_dims=[16], noise=noise)
    seen = []
    model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    x = torch.rand(64, *IMAGE_SHAPE) * 0.5 + 0.25

    model.train()
    torch.manual_seed(7)
    train_terms = model.loss(x)
    corrupted = seen[-1]
    assert not torch.equal(corrupted, x)
    reconstruction = model.decoder(model.encoder(corrupted))
    torch.testing.assert_close(train_terms["recon"], squared_error(x, reconstruction).mean())

    model.eval()
    model.loss(x)
    assert torch.equal(seen[-1], x)


def test_masking_drops_the_configured_fraction_and_gaussian_noise_has_its_std():
    torch.manual_seed(0)
    x = torch.ones(200_000)
    assert (Masking(0.3)(x) == 0).float().mean() == pytest.approx(0.3, abs=0.01)
    assert (GaussianNoise(0.2)(x) - x).std() == pytest.approx(0.2, rel=0.02)
    with pytest.raises(ValueError, match=r"model.noise.p must be in \[0, 1\)"):
        Masking(1.0)
    with pytest.raises(ValueError, match="model.noise.std must be >= 0"):
        GaussianNoise(-0.1)


def test_unknown_noise_kind_lists_choices():
    with pytest.raises(ValueError, match="gaussian, mask"):
        build_autoencoder(IMAGE_SHAPE, 2, "linear", "mse", noise={"kind": "salt"})


def test_ae_samples_from_a_fitted_latent_gaussian():
    model = build_autoencoder(IMAGE_SHAPE, 2, "linear", "mse").eval()
    codes = torch.randn(1000, 2) * torch.tensor([3.0, 0.5]) + torch.tensor([1.0, -2.0])
    model.fit_latent_gaussian(codes)
    torch.testing.assert_close(model.latent_loc, codes.mean(0))
    torch.testing.assert_close(model.latent_scale, codes.std(0))
    assert model.sample(4).shape == (4, *IMAGE_SHAPE)


# --- training behaviour ------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_a_train_step_changes_the_weights_and_an_eval_step_does_not(name):
    model = build_from_config(name)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.rand(8, *IMAGE_SHAPE)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        model.loss(x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    model.train()
    optimizer.zero_grad()
    model.loss(x, step=0)["loss"].backward()
    optimizer.step()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    params = [k for k, _ in model.named_parameters()]
    assert set(params) <= set(changed)


def test_models_and_run_loading_do_not_import_lightning_or_hydra():
    code = (
        "import sys, vae_experiments, vae_experiments.models; "
        "bad = [m for m in ('pytorch_lightning', 'lightning', 'hydra') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
