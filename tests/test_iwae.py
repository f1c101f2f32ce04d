"""The importance-weighted bound in training (model=iwae, model.k), the hierarchical VAE
(model=hvae) and the paper presets (experiment=...)."""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.distributions import Normal

from tests.conftest import CONFIG_DIR, compose_config, train_run
from tests.test_likelihood import closed_form_log_px, linear_gaussian_vae, sample_images, seeded
from vae_experiments import load_run
from vae_experiments.analysis.likelihood import evaluate_vae
from vae_experiments.models import MLP, VAE, Bernoulli, Conv, HierarchicalVAE, iwae_bound
from vae_experiments.runs import load_data, load_split
from vae_experiments.targets import ConfigError, instantiate

IMAGE_SHAPE = (1, 4, 4)
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def tiny_vae(k: int = 1, dtype=torch.float32) -> VAE:
    torch.manual_seed(0)
    model = VAE(IMAGE_SHAPE, 2, MLP([8], "tanh"), Bernoulli(), beta=1.0, kl_warmup_steps=0, k=k)
    return model.to(dtype)


def tiny_hvae(k: int = 1) -> HierarchicalVAE:
    torch.manual_seed(0)
    return HierarchicalVAE(
        IMAGE_SHAPE, [3, 2], MLP([8], "tanh"), MLP([5], "tanh"), Bernoulli(), 1.0, 0, k
    )


def binary_images(n: int = 6) -> torch.Tensor:
    return (torch.rand(n, *IMAGE_SHAPE, generator=seeded(7)) > 0.5).float()


def by_hand_log_w(model: VAE, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """log p(x | z) + log N(z; 0, I) - log q(z | x) with torch.distributions: (B, K)."""
    mu, logvar = model.posterior(x)
    std = torch.exp(0.5 * logvar)
    z = mu[:, None] + std[:, None] * noise  # (B, K, D)
    logits = model.decoder(z.flatten(0, 1)).view(*z.shape[:2], -1)
    log_px_z = torch.distributions.Bernoulli(logits=logits).log_prob(x.flatten(1)[:, None]).sum(-1)
    log_pz = Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_qz = Normal(mu[:, None], std[:, None]).log_prob(z).sum(-1)
    return log_px_z + log_pz - log_qz


# --- the bound --------------------------------------------------------------------------------


def test_k1_bound_is_the_single_sample_elbo_and_k1_training_is_the_vae():
    model, x = tiny_vae(k=1), binary_images()
    noise = torch.randn(6, 1, 2, generator=seeded())
    with torch.no_grad():
        log_w, _ = model.log_importance_weights(x, noise)
        torch.testing.assert_close(iwae_bound(log_w), by_hand_log_w(model, x, noise)[:, 0])

        # k=1 trains exactly the VAE's loss: the same draw, the analytic KL.
        torch.manual_seed(3)
        terms = model.loss(x, step=0)
        torch.manual_seed(3)
        mu, logvar = model.posterior(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        recon = -Bernoulli().log_prob(x, model.decoder(z))
        kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(1)
    assert "iwae_bound" not in terms
    torch.testing.assert_close(terms["loss"], (recon + kl).mean(), rtol=0, atol=0)
    torch.testing.assert_close(terms["elbo"], -(recon + kl).mean(), rtol=0, atol=0)


def test_training_with_k_samples_is_minus_the_bound_of_the_shared_log_weights():
    model, x = tiny_vae(k=4), binary_images()
    torch.manual_seed(1)
    terms = model.loss(x, step=0)
    torch.manual_seed(1)
    model.posterior(x)  # draws nothing; the noise is drawn after it
    noise = torch.randn(6, 4, 2)
    with torch.no_grad():
        expected = iwae_bound(by_hand_log_w(model, x, noise)).mean()
    torch.testing.assert_close(terms["iwae_bound"].detach(), expected)
    torch.testing.assert_close(terms["loss"].detach(), -expected)
    assert (
        terms["elbo"] <= terms["iwae_bound"] + 1.0
    )  # the k-sample ELBO estimate, below on average


def test_the_bound_does_not_decrease_with_k_on_average_over_seeds():
    model, x = tiny_vae(), binary_images(16)
    means = []
    with torch.no_grad():
        for k in (1, 2, 5, 20):
            bounds = [
                iwae_bound(model.log_importance_weights(x, torch.randn(16, k, 2, generator=g))[0])
                for g in (seeded(seed) for seed in range(100))
            ]
            means.append(float(torch.stack(bounds).mean()))
    assert means == sorted(means)
    assert means[-1] - means[0] > 0.05  # the untrained posterior leaves a gap to close


def test_the_gradient_of_the_bound_matches_finite_differences():
    model, x = tiny_vae(k=5, dtype=torch.float64), binary_images().double()
    noise = torch.randn(6, 5, 2, generator=seeded(), dtype=torch.float64)

    def objective() -> torch.Tensor:
        return iwae_bound(model.log_importance_weights(x, noise)[0]).mean()

    objective().backward()
    eps = 1e-6
    for name, parameter in model.named_parameters():
        for index in [(0,) * parameter.ndim, tuple(s - 1 for s in parameter.shape)]:
            with torch.no_grad():
                before = parameter[index].item()
                parameter[index] = before + eps
                up = objective().item()
                parameter[index] = before - eps
                down = objective().item()
                parameter[index] = before
            numeric = (up - down) / (2 * eps)
            assert parameter.grad[index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-7), name


def test_the_training_bound_tends_to_the_exact_log_likelihood_on_the_linear_gaussian_model():
    model, w, b, _ = linear_gaussian_vae()
    encoder = model.encoder.net[0]
    with torch.no_grad():  # a posterior that is not the true one: the bound is below log p(x)
        encoder.bias[:2] += 0.2
        encoder.bias[2:] += 0.7
    x = sample_images(w, b, 64)
    exact = float(closed_form_log_px(x, w, b).mean())
    gaps = []
    for k in (1, 10, 1000):
        model.k = k
        torch.manual_seed(0)
        with torch.no_grad():
            terms = model.loss(x)
        bound = terms["iwae_bound"] if k > 1 else terms["elbo"]
        gaps.append(exact - float(bound))
    assert gaps[0] > gaps[1] > gaps[2] > -0.01
    assert gaps[2] < 0.02


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.beta=4", "model.beta=4 is invalid: must be 1 with k=5"),
        ("model.kl_warmup_steps=100", "model.kl_warmup_steps=100 is invalid: must be 0 with k=5"),
        ("model.k=0", "model.k=0 is invalid: must be an integer >= 1"),
    ],
)
def test_iwae_refuses_what_it_cannot_mean(override, message):
    cfg = compose_config(["model=iwae", "model/network=mlp", override])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        instantiate(cfg.model, key="model", image_shape=[1, 8, 8])


# --- two stochastic layers --------------------------------------------------------------------


def test_hierarchical_k1_is_the_two_layer_elbo_by_hand():
    model, x = tiny_hvae(), binary_images()
    torch.manual_seed(2)
    terms = model.loss(x, step=0)
    torch.manual_seed(2)
    with torch.no_grad():
        mu1, logvar1 = model.posterior(x)
        noise = torch.randn(6, 1, 5)[:, 0]
        z1 = mu1 + torch.exp(0.5 * logvar1) * noise[:, :3]
        mu2, logvar2 = model.upper_encoders[0](z1).chunk(2, 1)
        z2 = mu2 + torch.exp(0.5 * logvar2) * noise[:, 3:]
        pmu1, plogvar1 = model.upper_decoders[0](z2).view(6, 2, 3).unbind(1)
        log_px = torch.distributions.Bernoulli(logits=model.decoder(z1).flatten(1))
        log_px_z1 = log_px.log_prob(x.flatten(1)).sum(1)
        log_p = Normal(0.0, 1.0).log_prob(z2).sum(1) + Normal(
            pmu1, torch.exp(0.5 * plogvar1)
        ).log_prob(z1).sum(1)
        log_q = Normal(mu1, torch.exp(0.5 * logvar1)).log_prob(z1).sum(1) + Normal(
            mu2, torch.exp(0.5 * logvar2)
        ).log_prob(z2).sum(1)
    elbo = log_px_z1 + log_p - log_q
    torch.testing.assert_close(terms["elbo"].detach(), elbo.mean())
    torch.testing.assert_close(terms["loss"].detach(), -elbo.mean())
    torch.testing.assert_close(terms["kl"].detach(), (log_q - log_p).mean())
    torch.testing.assert_close(terms["recon"].detach(), -log_px_z1.mean())


def test_hierarchical_shapes_terms_and_samples():
    model, x = tiny_hvae(k=3), binary_images()
    assert model.latent_dims == [3, 2] and model.noise_dim == 5 and model.latent_dim == 3
    assert model.encode(x).shape == (6, 3)
    assert [m.shape for m in model.posterior_means(x)] == [(6, 3), (6, 2)]
    log_w, log_px_z = model.log_importance_weights(x, torch.randn(6, 7, 5))
    assert log_w.shape == log_px_z.shape == (6, 7)
    terms = model.loss(x, step=0)
    assert set(terms) == {"loss", "iwae_bound", "recon", "kl", "elbo", "recon_mse"}
    assert all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    samples = model.sample(5, generator=seeded())
    assert samples.shape == (5, *IMAGE_SHAPE)
    torch.testing.assert_close(samples, model.sample(5, generator=seeded()))


def test_hierarchical_model_refuses_one_layer_and_a_conv_between_latents():
    with pytest.raises(ConfigError, match="latent_dims=\\[4\\] is invalid: must be two or more"):
        instantiate(
            compose_config(["model=hvae", "model.latent_dims=[4]"]).model,
            key="model",
            image_shape=[1, 8, 8],
        )
    with pytest.raises(ConfigError, match="upper_network=Conv is invalid: must be an MLP"):
        HierarchicalVAE(IMAGE_SHAPE, [3, 2], MLP([8]), Conv([8]), Bernoulli(), 1.0, 0, 1)


@pytest.fixture(scope="module")
def trained_hvae(tmp_path_factory):
    """A tiny two-layer IWAE (k=3) trained for one epoch on digits."""
    overrides = [
        "model=hvae",
        "model.latent_dims=[4,2]",
        "model.network.hidden_dims=[32]",
        "model.upper_network.hidden_dims=[8]",
        "model.k=3",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=5",
        "logger=none",
    ]
    return train_run(tmp_path_factory.mktemp("hvae") / "run", overrides)


def test_evaluate_and_sample_work_on_a_trained_two_layer_run(trained_hvae, capsys):
    from vae_experiments.cli.evaluate import evaluate
    from vae_experiments.cli.sample import sample_latents

    model, cfg = load_run(trained_hvae)
    x, _ = load_split(load_data(cfg), "test")
    results = evaluate_vae(model, [x[:100]], k=20, max_batch_elems=2**16, generator=seeded())
    assert len(results["active_units_per_layer"]) == 2
    assert results["active_units"] == sum(results["active_units_per_layer"])
    assert results["log_px"] >= results["elbo"] and math.isfinite(results["kl"])

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        eval_cfg = compose(config_name="evaluate", overrides=[f"run={trained_hvae}", "k=5"])
    evaluate(eval_cfg)
    assert "(per layer: " in capsys.readouterr().out

    out_dir = trained_hvae / "analysis" / "sample-prior"
    result = sample_latents(trained_hvae, density="prior", n=4, traversal_dims=2, out_dir=out_dir)
    assert result["sampled"]["density"] == "prior"
    assert (out_dir / "samples_prior.png").is_file()


# --- presets ----------------------------------------------------------------------------------


def test_the_presets_are_there():
    assert set(EXPERIMENTS) >= {
        "burda_vae_1layer",
        "burda_iwae_k5",
        "burda_iwae_k50",
        "burda_vae_2layer",
        "burda_iwae_2layer_k50",
        "hinton_deep_ae",
        "sohn_cvae",
        "vandenoord_vqvae",
    }


def test_a_preset_sets_the_papers_setting_and_takes_overrides_after_it():
    cfg = compose_config(["experiment=burda_iwae_k50", "trainer.max_epochs=50"])
    assert cfg.model.k == 50 and cfg.model.latent_dim == 50
    assert list(cfg.model.network.hidden_dims) == [200, 200]
    assert cfg.model.network.activation == "tanh"
    assert cfg.data.source._target_.endswith(".MNIST") and cfg.data.binarize == "dynamic"
    assert cfg.data.batch_size == 20 and cfg.optimizer.eps == 1e-4
    assert cfg.trainer.max_epochs == 50
    assert list(cfg.scheduler.scheduler.milestones) == [1, 4, 13, 40, 121, 364, 1093]
    assert cfg.scheduler.scheduler.gamma == pytest.approx(10 ** (-1 / 7))


def test_the_cvae_preset_sets_sohn_et_al_s_networks():
    cfg = compose_config(["experiment=sohn_cvae"])
    assert cfg.model._target_.endswith(".CVAE") and cfg.model.latent_dim == 200
    assert list(cfg.model.network.hidden_dims) == [1000, 1000]
    assert cfg.model.network.activation == "relu"
    assert cfg.data.source._target_.endswith(".MNIST") and cfg.data.binarize == "dynamic"
    assert cfg.optimizer.lr == 1e-3


def test_the_vqvae_preset_sets_van_den_oord_et_al_s_setting():
    cfg = compose_config(["experiment=vandenoord_vqvae", "data=digits"])
    assert cfg.model._target_.endswith(".VQVAE")
    assert cfg.model.num_codes == 512 and cfg.model.commitment_weight == 0.25
    assert cfg.model.ema_decay is None and cfg.model.dead_code_steps is None
    assert cfg.model.network.channels == [256, 256] and cfg.model.network.residual_blocks == 2
    assert cfg.optimizer.lr == 2e-4 and cfg.data.batch_size == 128
    assert cfg.trainer.max_epochs * 430 >= 250_000  # Fashion-MNIST: 430 batches of 128
    model = instantiate(cfg.model, key="model", image_shape=[1, 28, 28])
    assert model.encoder.grid_shape == (7, 7)  # two stride-2 blocks
    assert len(model.encoder.residual) == len(model.decoder.residual) == 2


def test_the_burda_schedule_gives_their_learning_rates():
    cfg = compose_config(["scheduler=burda", "optimizer.lr=1e-3"])
    optimizer = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    scheduler = instantiate(cfg.scheduler.scheduler)(optimizer)
    rates = []
    for _ in range(3280):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    stages = [3**i for i in range(8)]
    expected = [1e-3 * 10 ** (-i / 7) for i, n in enumerate(stages) for _ in range(n)]
    assert rates == pytest.approx(expected, rel=1e-9)


# Two presets in the default run (two layers, k=50: the most machinery; the VQ-VAE's residual
# body); the others with -m slow.
DEFAULT_RUN_PRESETS = {"burda_iwae_2layer_k50", "vandenoord_vqvae"}


@pytest.mark.parametrize(
    "name",
    [
        name if name in DEFAULT_RUN_PRESETS else pytest.param(name, marks=pytest.mark.slow)
        for name in EXPERIMENTS
    ],
)
def test_every_preset_trains_a_few_steps_on_digits(tmp_path, name):
    overrides = [
        f"experiment={name}",
        "data=digits",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=3",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
        "logger=none",
        "callbacks.latent_samples.enabled=false",
    ]
    if "2layer" in name:  # sized by latent_dims: train_run leaves out FAST's latent_dim
        overrides.append("model.latent_dims=[100,50]")
    run_dir = train_run(tmp_path / "run", overrides)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_the_upper_network_is_a_group_choice_of_its_own():
    """model=hvae's upper network (z1 <-> z2) is chosen like the main one, and its default's
    widths do not leak into another choice."""
    default = compose_config(["model=hvae", "model.latent_dims=[3,2]"]).model
    assert default.upper_network.hidden_dims == [100, 100]
    assert default.upper_network.activation == "tanh"
    linear = compose_config(
        ["model=hvae", "model.latent_dims=[3,2]", "model/network@model.upper_network=linear"]
    ).model
    assert "hidden_dims" not in linear.upper_network
    model = instantiate(linear, key="model", image_shape=list(IMAGE_SHAPE))
    terms = model.loss(binary_images())
    assert torch.isfinite(terms["loss"])
