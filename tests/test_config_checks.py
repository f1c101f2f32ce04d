"""Config values are checked before any data is read or model built, with messages that name the
key, the bad value and what is allowed."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DATA_CONFIGS, MODEL_CONFIGS, compose_config
from vae_experiments import targets
from vae_experiments.data import ImageData
from vae_experiments.training.config_checks import (
    ConfigError,
    check_config,
    check_model_fits_data,
    config_problems,
)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.latent_dim=0"], "model.latent_dim=0 is invalid: must be an integer >= 1"),
        (["model.latent_dim=2.5"], "model.latent_dim=2.5 is invalid: must be an integer >= 1"),
        (
            ["model=denoising_ae", "model.noise.std=-0.1"],
            "model.noise.std=-0.1 is invalid: must be a number >= 0",
        ),
        (
            ["model=denoising_ae", "model.noise.kind=mask", "model.noise.p=1.0"],
            "model.noise.p=1.0 is invalid: must be a number in [0, 1)",
        ),
        (
            ["model=denoising_ae", "model.noise.p=-0.5"],
            "model.noise.p=-0.5 is invalid: must be a number in [0, 1)",
        ),
        (
            ["model=denoising_ae", "model.noise.kind=salt"],
            "model.noise.kind=salt is invalid: must be one of gaussian, mask",
        ),
        (
            ["trainer.gradient_clip_val=-1"],
            "trainer.gradient_clip_val=-1 is invalid: must be null (no clipping) or a number >= 0",
        ),
        (
            ["trainer.gradient_clip_algorithm=l2"],
            "trainer.gradient_clip_algorithm=l2 is invalid: must be one of norm, value",
        ),
        (["model.arch=resnet"], "model.arch=resnet is invalid: must be one of linear, mlp, conv"),
        (
            ["model.conv_channels=[]"],
            "model.conv_channels=[] is invalid: must be a list of integers >= 1, not empty",
        ),
        (
            ["model.hidden_dims=[64,0]"],
            "model.hidden_dims=[64, 0] is invalid: must be a list of integers >= 1",
        ),
        (
            ["model.likelihood=poisson"],
            "model.likelihood=poisson is invalid: must be one of bernoulli, gaussian",
        ),
        (["model.sigma=0"], "model.sigma=0 is invalid: must be a number > 0"),
        (["model.beta=-1"], "model.beta=-1 is invalid: must be a number >= 0"),
        (
            ["model.kl_warmup_steps=-5"],
            "model.kl_warmup_steps=-5 is invalid: must be an integer >= 0",
        ),
        (["model=ae", "model.recon_loss=l1"], "model.recon_loss=l1 is invalid: must be one of"),
        (
            ["trainer.max_epochs=-3"],
            "trainer.max_epochs=-3 is invalid: must be an integer >= 0, or -1 (no limit)",
        ),
        (["test_ckpt=first"], "test_ckpt=first is invalid: must be one of best, last"),
        (["seed=-1"], "seed=-1 is invalid: must be an integer >= 0"),
    ],
)
def test_each_rule_names_the_key_the_value_and_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError) as error:
        check_config(compose_config(overrides))
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.batch_size=0"], "data.batch_size=0 is invalid: must be an integer >= 1"),
        (["data.num_workers=-1"], "data.num_workers=-1 is invalid: must be an integer >= 0"),
        (
            ["data.binarize=always"],
            "data.binarize=always is invalid: must be one of none, static, dynamic",
        ),
        (
            ["data=celeba", "data.source.image_size=0"],
            "data.source.image_size=0 is invalid: must be an integer >= 1",
        ),
        (["data.batch_size=abc"], "data.batch_size=abc is invalid: must be an integer"),
    ],
)
def test_data_rules_live_in_the_constructors_and_name_the_key(overrides, message):
    with pytest.raises(targets.ConfigError) as error:
        targets.instantiate(compose_config(overrides).data, key="data")
    assert message in str(error.value)


@pytest.mark.parametrize("config", MODEL_CONFIGS)
def test_every_shipped_model_config_passes(config):
    assert config_problems(compose_config([f"model={config}"])) == []


@pytest.mark.parametrize("config", DATA_CONFIGS)
def test_every_shipped_data_config_passes(config):
    assert config_problems(compose_config([f"data={config}"])) == []


def test_edge_values_that_are_allowed():
    cfg = compose_config(
        [
            "model=denoising_ae",
            "model.latent_dim=1",
            "model.noise.std=0",
            "model.noise.p=0",
            "data.batch_size=1",
            "trainer.max_epochs=-1",
            "trainer.gradient_clip_val=0",
            "trainer.gradient_clip_algorithm=value",
        ]
    )
    assert config_problems(cfg) == []


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as error:
        check_config(compose_config(["model.latent_dim=0", "seed=-1"]))
    text = str(error.value)
    assert text.startswith("2 invalid config values:")
    assert "model.latent_dim=0 is invalid" in text and "seed=-1 is invalid" in text


def test_conv_arch_rejects_images_too_small_naming_the_arch_and_the_sizes_allowed(make_config):
    cfg = make_config(["model.arch=conv"])
    with pytest.raises(ConfigError) as error:
        check_model_fits_data(cfg.model, (1, 2, 5), (0.0, 1.0), "TinyData")
    text = str(error.value)
    assert "model.arch=conv cannot take the 2x5 images of TinyData (shape (1, 2, 5))" in text
    assert "height and width >= 3" in text and "model.arch=mlp" in text
    check_model_fits_data(cfg.model, (1, 3, 3), (0.0, 1.0), "TinyData")  # the smallest allowed
    mlp = make_config(["model.arch=mlp"])
    check_model_fits_data(mlp.model, (1, 2, 2), (0.0, 1.0), "TinyData")


@pytest.mark.parametrize(
    ("overrides", "setting", "alternative"),
    [
        (["model=vae", "model.likelihood=bernoulli"], "model.likelihood=bernoulli", "gaussian"),
        (["model=ae", "model.recon_loss=bce"], "model.recon_loss=bce", "model.recon_loss=mse"),
    ],
)
def test_bernoulli_likelihood_needs_data_in_the_unit_interval(overrides, setting, alternative):
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError) as error:
        check_model_fits_data(cfg.model, (1, 8, 8), (-1.0, 1.0), "CenteredDigits")
    assert (
        f"{setting} needs pixel values in [0, 1], but CenteredDigits gives values in [-1, 1]"
        in (str(error.value))
    )
    assert alternative in str(error.value)
    check_model_fits_data(cfg.model, (1, 8, 8), (0.0, 1.0), "Digits")


class CenteredData(ImageData):
    """Images scaled to [-1, 1], as data that normalises its images would be."""

    value_range = (-1.0, 1.0)

    def to_float(self, images):
        return super().to_float(images) * 2 - 1


def test_conv_arch_check_runs_on_the_data_modules_shape(tmp_path):
    from vae_experiments.training import train

    cfg = compose_config(["data=synthetic", "data.source.image_shape=[1,2,2]", "model.arch=conv"])
    with pytest.raises(ConfigError, match="model.arch=conv cannot take the 2x2 images of Synth"):
        train(cfg, tmp_path / "run")


def test_data_declares_its_value_range():
    data = targets.instantiate(compose_config([]).data)
    assert ImageData.value_range == (0.0, 1.0)
    images = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = data.to_float(images)
    assert (x.min().item(), x.max().item()) == data.value_range


def test_training_fails_on_a_mismatch_before_reading_data(tmp_path, monkeypatch):
    from vae_experiments.training import train

    monkeypatch.setattr(targets, "ALLOWED_TARGETS", (*targets.ALLOWED_TARGETS, "tests."))
    cfg = compose_config(["model=vae", "data._target_=tests.test_config_checks.CenteredData"])
    with pytest.raises(ConfigError, match="model.likelihood=bernoulli needs pixel values in"):
        train(cfg, tmp_path / "run")
    # A bad value fails before the data module is even built: this folder does not exist.
    cfg = compose_config(
        ["data=image_folder", "data.source.path=/no/such/folder", "model.latent_dim=0"]
    )
    with pytest.raises(ConfigError, match="model.latent_dim=0 is invalid"):
        train(cfg, tmp_path / "run2")
    assert not (tmp_path / "run" / "checkpoints").exists()
