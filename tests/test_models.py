"""Models: every config builds, shapes are right, and each loss term matches its formula."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import CONFIG_DIR, MODEL_CONFIGS, compose_config, small_model_config
from vae_experiments.models import (
    MLP,
    VAE,
    Autoencoder,
    Bernoulli,
    Conv,
    Gaussian,
    GaussianNoise,
    Linear,
    Masking,
    SquaredError,
    gaussian_kl,
)
from vae_experiments.models.base import squared_error
from vae_experiments.models.likelihoods import DiscretizedLogistic, Laplace
from vae_experiments.targets import ConfigError, instantiate, resolve_target

IMAGE_SHAPE = (1, 8, 8)
NUM_CLASSES = 3  # of the labels a model that needs them is built for here
DATASET_SIZE = 100  # the training set's size, for a model that weights by it (β-TCVAE)
#: Terms a model logs beside its kind's (loss, recon, recon_mse; kl, elbo for a VAE).
EXTRA_TERMS = {
    "BetaTCVAE": {"mi", "tc", "dim_kl"},
    "CapacityVAE": {"capacity"},
    "FactorVAE": {"tc", "adversary_loss"},
}


def build_from_config(name: str, image_shape=IMAGE_SHAPE, overrides=()):
    # A stack of latent layers has z1 of size 3 as its code.
    latent = "model.latent_dims=[3,2]" if name == "hvae" else "model.latent_dim=3"
    cfg = compose_config([f"model={name}", latent, *overrides])
    # What training gives from the data: the image shape, and the classes where labels are used.
    supplied = {"image_shape": list(image_shape)}
    if getattr(resolve_target(cfg.model._target_), "needs_labels", False):
        supplied["num_classes"] = NUM_CLASSES
    if getattr(resolve_target(cfg.model._target_), "needs_dataset_size", False):
        supplied["dataset_size"] = DATASET_SIZE
    return instantiate(small_model_config(cfg.model), key="model", **supplied)


def vae(network=None, likelihood=None, latent_dim=3, beta=1.0, kl_warmup_steps=0) -> VAE:
    """A VAE on IMAGE_SHAPE: MLP([16]) and Bernoulli unless given."""
    network = MLP([16]) if network is None else network
    likelihood = Bernoulli() if likelihood is None else likelihood
    return VAE(IMAGE_SHAPE, latent_dim, network, likelihood, beta, kl_warmup_steps)


def autoencoder(network=None, likelihood=None, latent_dim=3, corruption=None) -> Autoencoder:
    """An autoencoder on IMAGE_SHAPE: MLP([16]) and squared error unless given."""
    network = MLP([16]) if network is None else network
    likelihood = SquaredError() if likelihood is None else likelihood
    return Autoencoder(IMAGE_SHAPE, latent_dim, network, likelihood, corruption)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
@pytest.mark.parametrize("image_shape", [(1, 8, 8), (3, 28, 20)])
def test_every_model_config_builds_and_has_the_interface(name, image_shape):
    model = build_from_config(name, image_shape)
    # Labels go to every model in one signature; those that need none ignore them.
    x, y = torch.rand(4, *image_shape), torch.tensor([0, 1, 2, 1])
    codes = model.encode(x, y)
    if model.discrete_codes:  # a VQ-VAE: grids of codebook indices, sampled through a prior
        assert codes.shape == (4, *model.grid_shape) and codes.dtype == torch.int64
        model.set_code_prior(model.prior_recipe.build(model.grid_shape, model.num_codes))
    else:
        assert codes.shape == (4, 3)
        assert model.decode(torch.randn(4, 3), y).shape == x.shape
    assert model.decode(codes, y).shape == x.shape
    assert model.reconstruct(x, y).shape == x.shape
    assert model.sample(5).shape == (5, *image_shape)
    assert model.sample(4, y=y).shape == (4, *image_shape)
    if not model.needs_labels:
        assert model.encode(x).shape == codes.shape

    terms = model.loss(x, y, step=0)
    expected = {"loss", "recon", "recon_mse"} | ({"kl", "elbo"} if model.has_prior else set())
    expected |= {"iwae_bound"} if getattr(model, "k", 1) > 1 else set()
    expected |= EXTRA_TERMS.get(type(model).__name__, set())
    if model.discrete_codes:
        expected |= {"codebook", "commitment", "perplexity", "codes_in_use"}
    assert set(terms) == expected
    for value in terms.values():
        assert value.shape == () and torch.isfinite(value)
    terms["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
@pytest.mark.parametrize("kl_warmup", [False, True])
def test_a_step_nobody_logs_has_the_same_loss_and_gradients_without_monitoring_terms(
    name, kl_warmup
):
    """``loss(..., monitor=False)``, the training steps between logging points: the same loss
    and gradients bit for bit from the same random draws, only monitoring terms left out."""
    overrides = ["model.kl_warmup_steps=10"] if kl_warmup and name in ("vae", "cvae") else []
    model = build_from_config(name, overrides=overrides).train()
    x = torch.bernoulli(torch.rand(4, *IMAGE_SHAPE))
    y = torch.tensor([0, 1, 2, 1])
    # The codebook's own updates (EMA, restarts) happen in the loss: each pass starts alike.
    start = {key: value.clone() for key, value in model.state_dict().items()}
    results = []
    for monitor in (True, False):
        model.load_state_dict(start)
        torch.manual_seed(1)
        model.zero_grad()
        terms = model.loss(x, y, step=3, monitor=monitor)
        terms["loss"].backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((terms, grads))
    (full, full_grads), (lean, lean_grads) = results
    assert set(lean) <= set(full) and "loss" in lean
    assert set(full) - set(lean) <= {"elbo", "recon_mse"}
    for term, value in lean.items():
        assert torch.equal(value, full[term]), term
    assert len(lean_grads) == len(full_grads)
    assert all(torch.equal(a, b) for a, b in zip(lean_grads, full_grads, strict=True))


def config_files(group: str) -> list[str]:
    """The options of a config group nested in ``model/``, e.g. ``network``: a new file there is
    tested for free."""
    return sorted(p.stem for p in (CONFIG_DIR / "model" / group).glob("*.yaml"))


PART_CLASSES = {
    "network": {"linear": Linear, "mlp": MLP, "conv": Conv},
    "likelihood": {
        "bernoulli": Bernoulli,
        "discretized_logistic": DiscretizedLogistic,
        "gaussian": Gaussian,
        "laplace": Laplace,
        "squared_error": SquaredError,
    },
    "corruption": {"gaussian_noise": GaussianNoise, "mask": Masking},
}


@pytest.mark.parametrize("name", config_files("network"))
@pytest.mark.parametrize("model_name", ["ae", "vae"])
def test_every_network_config_composes_and_builds_for_every_model(model_name, name):
    model = build_from_config(model_name, overrides=[f"model/network={name}"])
    assert model.reconstruct(torch.rand(2, *IMAGE_SHAPE)).shape == (2, *IMAGE_SHAPE)
    assert torch.isfinite(model.loss(torch.rand(2, *IMAGE_SHAPE))["loss"])


@pytest.mark.parametrize("name", config_files("likelihood"))
@pytest.mark.parametrize("model_name", ["ae", "vae"])
def test_every_likelihood_config_composes_and_builds_for_every_model(model_name, name):
    model = build_from_config(model_name, overrides=[f"model/likelihood={name}"])
    assert isinstance(model.likelihood, torch.nn.Module)
    terms = model.loss(torch.rand(4, *IMAGE_SHAPE), step=0)
    assert all(torch.isfinite(value) for value in terms.values())


@pytest.mark.parametrize("name", config_files("corruption"))
def test_every_corruption_config_composes_and_builds(name):
    model = build_from_config("ae", overrides=[f"model/corruption={name}"]).train()
    x = torch.rand(4, *IMAGE_SHAPE)
    assert model.corruption(x).shape == x.shape
    assert torch.isfinite(model.loss(x)["loss"])


def test_ae_has_no_corruption_unless_one_is_chosen():
    assert build_from_config("ae").corruption is None
    assert isinstance(build_from_config("denoising_ae").corruption, GaussianNoise)


@pytest.mark.parametrize(
    ("group", "name"),
    [(group, name) for group, names in PART_CLASSES.items() for name in names],
)
def test_choosing_a_part_on_the_command_line_changes_the_built_class(group, name):
    model_name = "ae" if group == "corruption" else "vae"
    model = build_from_config(model_name, overrides=[f"model/{group}={name}"])
    if group == "network":
        # The body is a recipe; the modules it built show which one it was.
        encoders = {"linear": "MLPEncoder", "mlp": "MLPEncoder", "conv": "ConvEncoder"}
        assert type(model.encoder).__name__ == encoders[name]
        hidden = [m for m in model.encoder.modules() if isinstance(m, torch.nn.ReLU)]
        assert bool(hidden) == (name == "mlp")
    else:
        assert type(getattr(model, group)) is PART_CLASSES[group][name]


def test_part_values_are_set_on_the_command_line():
    model = build_from_config(
        "vae", overrides=["model/likelihood=gaussian", "model.likelihood.sigma=0.05"]
    )
    assert float(model.likelihood.sigma) == pytest.approx(0.05)
    model = build_from_config(
        "denoising_ae", overrides=["model/corruption=mask", "model.corruption.p=0.2"]
    )
    assert isinstance(model.corruption, Masking) and model.corruption.p == 0.2
    cfg = compose_config(["model=vae", "model/network=mlp", "model.network.hidden_dims=[24]"])
    model = instantiate(cfg.model, key="model", image_shape=list(IMAGE_SHAPE))
    assert model.encoder.net[0].out_features == 24


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model/network=mlp", "model.network.hidden_dims=[0]"],
            "model.network.hidden_dims=[0] is invalid: must be a list of integers >= 1",
        ),
        (
            ["model.network.channels=[]"],
            "model.network.channels=[] is invalid: must be a non-empty list of integers >= 1",
        ),
        (["model.latent_dim=0"], "model.latent_dim=0 is invalid: must be an integer >= 1"),
        (["model.latent_dim=2.5"], "model.latent_dim=2.5 is invalid: must be an integer"),
        (["model.beta=-1"], "model.beta=-1 is invalid: must be a number >= 0"),
        (
            ["model.kl_warmup_steps=-5"],
            "model.kl_warmup_steps=-5 is invalid: must be an integer >= 0",
        ),
        (
            ["model/likelihood=gaussian", "model.likelihood.sigma=0"],
            "model.likelihood.sigma=0 is invalid: must be a number > 0",
        ),
        (
            ["model/likelihood=gaussian", "model.likelihood.min_sigma=0"],
            "model.likelihood.min_sigma=0 is invalid: must be a number > 0",
        ),
        (
            [
                "model/likelihood=gaussian",
                "model.likelihood.learn_sigma=true",
                "model.likelihood.sigma=0.001",
            ],
            "model.likelihood.sigma=0.001 is invalid: must be >= min_sigma=0.002 (the lower "
            "bound of a learned sigma): raise sigma or lower min_sigma",
        ),
        (
            ["model=denoising_ae", "model.corruption.std=-0.1"],
            "model.corruption.std=-0.1 is invalid: must be a number >= 0",
        ),
        (
            ["model=denoising_ae", "model/corruption=mask", "model.corruption.p=1.0"],
            "model.corruption.p=1.0 is invalid: must be a number in [0, 1)",
        ),
        (
            ["model=ae", "model/corruption=mask", "model.corruption.p=-0.5"],
            "model.corruption.p=-0.5 is invalid: must be a number in [0, 1)",
        ),
    ],
)
def test_a_bad_value_fails_at_construction_with_its_full_key(overrides, message):
    cfg = compose_config(["model=vae", *overrides])
    with pytest.raises(ConfigError) as error:
        instantiate(cfg.model, key="model", image_shape=list(IMAGE_SHAPE))
    assert str(error.value) == message


def test_conv_on_images_too_small_fails_at_construction_naming_the_network():
    cfg = compose_config(["model=vae", "model/network=conv"])
    with pytest.raises(ConfigError) as error:
        instantiate(cfg.model, key="model", image_shape=[1, 1, 2])
    text = str(error.value)
    assert text.startswith("model.network: a conv network cannot take images of shape (1, 1, 2)")
    assert "height and width >= 3" in text and "model/network=mlp" in text
    instantiate(cfg.model, key="model", image_shape=[1, 3, 3])  # the smallest allowed
    cfg = compose_config(["model=vae", "model/network=mlp"])
    instantiate(cfg.model, key="model", image_shape=[1, 1, 2])


def test_edge_values_that_are_allowed():
    cfg = compose_config(["model=denoising_ae", "model.latent_dim=1", "model.corruption.std=0"])
    instantiate(cfg.model, key="model", image_shape=list(IMAGE_SHAPE))
    cfg = compose_config(["model=ae", "model/corruption=mask", "model.corruption.p=0"])
    instantiate(cfg.model, key="model", image_shape=list(IMAGE_SHAPE))
    cfg = compose_config(["model=vae", "model.beta=0", "model/network=mlp"])
    instantiate(cfg.model, key="model", image_shape=list(IMAGE_SHAPE))


def test_default_deep_models_are_convolutional():
    assert type(build_from_config("ae").encoder).__name__ == "ConvEncoder"
    assert type(build_from_config("vae").encoder).__name__ == "ConvEncoder"
    assert type(build_from_config("linear_ae").encoder).__name__ == "MLPEncoder"


def test_state_dict_keys_are_those_of_checkpoints_written_before_parts_were_configs():
    # Checkpoints of earlier runs must still load: the same module names, in the same order.
    linear = build_from_config("linear_ae")
    assert list(linear.state_dict()) == [
        "latent_loc",
        "latent_scale",
        "decoder.net.0.weight",
        "decoder.net.0.bias",
        "encoder.net.0.weight",
        "encoder.net.0.bias",
    ]
    mlp = build_from_config(
        "vae",
        overrides=[
            "model/network=mlp",
            "model/likelihood=gaussian",
            "model.likelihood.learn_sigma=true",
        ],
    )
    assert list(mlp.state_dict()) == [
        *(f"decoder.net.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")),
        "likelihood.log_sigma",
        *(f"encoder.net.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")),
    ]
    conv = build_from_config("vae", overrides=["model/likelihood=bernoulli"])  # theirs
    prefixes = list(
        dict.fromkeys(k.split(".")[0] + "." + k.split(".")[1] for k in conv.state_dict())
    )
    assert prefixes == [
        "decoder.head",
        "decoder.blocks",
        "decoder.out",
        "encoder.blocks",
        "encoder.head",
    ]


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
    torch.testing.assert_close(
        Gaussian(sigma, learn_sigma=False, min_sigma=1e-3).log_prob(x, mean), expected
    )


def test_gaussian_sigma_is_fixed_or_learned():
    fixed = Gaussian(0.5, learn_sigma=False, min_sigma=1e-3)
    learned = Gaussian(0.5, learn_sigma=True, min_sigma=1e-3)
    assert list(fixed.parameters()) == []
    assert [p.shape for p in learned.parameters()] == [torch.Size([])]
    learned.log_prob(torch.rand(2, 1, 2, 2), torch.rand(2, 1, 2, 2)).sum().backward()
    assert learned.log_sigma.grad is not None
    assert math.isclose(float(learned.sigma.detach()), 0.5, rel_tol=1e-6)


def test_learned_sigma_stays_above_min_sigma_on_constant_images():
    # A decoder can reproduce constant images exactly; the likelihood alone would then drive sigma
    # (and the "ELBO") without bound; min_sigma caps log p(x) at -log(min_sigma sqrt(2 pi)) a pixel.
    min_sigma = 0.002
    likelihood = Gaussian(0.1, learn_sigma=True, min_sigma=min_sigma)
    x = torch.full((16, *IMAGE_SHAPE), 0.5)
    optimizer = torch.optim.Adam(likelihood.parameters(), lr=0.1)
    for _ in range(150):  # the decoder has learned x: only sigma is left to improve the loss
        optimizer.zero_grad()
        (-likelihood.log_prob(x, x).mean()).backward()
        optimizer.step()
    sigma = float(likelihood.sigma.detach())
    assert min_sigma < sigma < 1.1 * min_sigma  # pushed down onto the bound, not through it
    cap = -math.log(min_sigma * math.sqrt(2 * math.pi)) * x[0].numel()  # 339 nats an image
    with torch.no_grad():
        assert likelihood.log_prob(x, x).max() <= cap
        assert likelihood.log_prob(x, x + 0.01).max() <= cap


def test_min_sigma_bounds_softly_with_a_gradient_and_leaves_sigma_above_it_as_learned():
    likelihood = Gaussian(0.05, learn_sigma=True, min_sigma=0.002)
    sigma = float(likelihood.sigma.detach())
    assert sigma == pytest.approx(0.05, rel=1e-6)  # as learned, well above the bound
    x = torch.rand(2, 1, 2, 2)
    for log_sigma in (math.log(0.004), math.log(0.002), math.log(1e-5)):
        likelihood.log_sigma.data.fill_(log_sigma)
        assert float(likelihood.sigma.detach()) >= 0.002 * (1 - 1e-6)  # up to float32 rounding
        likelihood.log_sigma.grad = None
        likelihood.log_prob(x, x + 0.5).sum().backward()
        assert float(likelihood.log_sigma.grad) != 0  # a learned sigma can always come back up
    fixed = Gaussian(0.001, learn_sigma=False, min_sigma=0.002)  # a fixed sigma is as given
    assert float(fixed.sigma) == pytest.approx(0.001)


@pytest.mark.parametrize("b", [0.05, 1.0, 3.0])
def test_laplace_matches_torch_laplace_summed_over_pixels(b):
    x, mean = torch.rand(6, 3, 4, 5), torch.rand(6, 3, 4, 5)
    log_prob = Laplace(b).log_prob(x, mean)
    assert log_prob.shape == (6,)
    expected = torch.distributions.Laplace(mean, b).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(log_prob, expected)
    assert Laplace(b).mean(mean) is mean and Laplace.support == "continuous"
    assert list(Laplace(b).parameters()) == []  # b is fixed, not learned


def test_laplace_scale_must_be_positive_and_names_its_full_key():
    with pytest.raises(ConfigError, match="b=0.0 is invalid: must be a number > 0"):
        Laplace(0.0)
    with pytest.raises(ConfigError, match=r"model\.likelihood\.b=-1\.0 is invalid"):
        build_from_config("vae", overrides=["model/likelihood=laplace", "model.likelihood.b=-1.0"])


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
    model = vae(beta=4.0)
    x = torch.rand(8, *IMAGE_SHAPE)
    terms = model.loss(x)
    torch.testing.assert_close(terms["elbo"], -(terms["recon"] + terms["kl"]))
    torch.testing.assert_close(terms["loss"], terms["recon"] + 4.0 * terms["kl"])
    assert terms["kl"] >= 0


def test_vae_recon_is_the_likelihood_at_the_reparameterised_sample():
    model = vae(likelihood=Gaussian(0.3, learn_sigma=False, min_sigma=1e-3))
    x = torch.rand(5, *IMAGE_SHAPE)
    torch.manual_seed(3)
    terms = model.loss(x)
    torch.manual_seed(3)
    mu, logvar = model.posterior(x)
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    expected = -torch.distributions.Normal(model.decoder(z), 0.3).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(terms["recon"], expected.mean())


def test_kl_warmup_is_linear_then_beta():
    model = vae(Linear(), latent_dim=2, beta=2.0, kl_warmup_steps=10)
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
    model = vae().eval()
    x = torch.rand(5, *IMAGE_SHAPE)
    expected = squared_error(x, model.reconstruct(x)).mean()
    torch.testing.assert_close(model.loss(x)["recon_mse"], expected)
    torch.testing.assert_close(model.loss(x)["recon_mse"], expected)  # deterministic in eval


def test_vae_samples_from_the_prior_are_probabilities():
    model = vae(Conv([4, 8])).eval()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    samples = model.sample(7, generator=g1)
    assert samples.shape == (7, *IMAGE_SHAPE)
    assert samples.min() >= 0 and samples.max() <= 1
    torch.testing.assert_close(samples, model.sample(7, generator=g2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta": -1.0}, r"^beta=-1.0 is invalid: must be a number >= 0$"),
        ({"kl_warmup_steps": -5}, r"^kl_warmup_steps=-5 is invalid: must be an integer >= 0$"),
        ({"latent_dim": 0}, r"^latent_dim=0 is invalid: must be an integer >= 1$"),
    ],
)
def test_bad_vae_settings_fail_with_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        vae(Linear(), **kwargs)
    with pytest.raises(ConfigError, match=r"^sigma=0.0 is invalid: must be a number > 0$"):
        Gaussian(0.0, learn_sigma=False, min_sigma=1e-3)


# --- autoencoders ------------------------------------------------------------------------------


def test_ae_recon_is_the_squared_error_of_the_reconstruction():
    model = autoencoder().eval()
    x = torch.rand(5, *IMAGE_SHAPE)
    terms = model.loss(x)
    expected = ((model.reconstruct(x) - x) ** 2).sum((1, 2, 3)).mean()
    torch.testing.assert_close(terms["recon"], expected)
    torch.testing.assert_close(terms["recon_mse"], expected)
    assert terms["loss"] is terms["recon"]


def test_ae_with_bce_reports_cross_entropy_and_mse_separately():
    model = autoencoder(likelihood=Bernoulli()).eval()
    x = torch.rand(5, *IMAGE_SHAPE)
    logits = model.decoder(model.encode(x))
    expected = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / 5
    terms = model.loss(x)
    torch.testing.assert_close(terms["recon"], expected)
    torch.testing.assert_close(terms["recon_mse"], squared_error(x, torch.sigmoid(logits)).mean())


@pytest.mark.parametrize("noise", [GaussianNoise(0.5), Masking(0.5)], ids=["gaussian", "mask"])
def test_denoising_corrupts_the_input_in_training_only_and_scores_the_clean_target(noise):
    model = autoencoder(corruption=noise)
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
    with pytest.raises(ConfigError, match=r"^p=1.0 is invalid: must be a number in \[0, 1\)$"):
        Masking(1.0)
    with pytest.raises(ConfigError, match=r"^std=-0.1 is invalid: must be a number >= 0$"):
        GaussianNoise(-0.1)


def test_ae_samples_from_a_fitted_latent_gaussian():
    model = autoencoder(Linear(), latent_dim=2).eval()
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
    x, y = torch.rand(8, *IMAGE_SHAPE), torch.arange(8) % NUM_CLASSES

    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        model.loss(x, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    model.train()
    optimizer.zero_grad()
    model.loss(x, y, step=0)["loss"].backward()
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
