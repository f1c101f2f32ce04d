"""Config values are checked before any data is read or model built, with messages that name the
key, the bad value and what is allowed. (The model's values are checked by its constructors:
tests/test_models.py.)"""

from __future__ import annotations

import pytest

from tests.conftest import DATA_CONFIGS, MODEL_CONFIGS, compose_config
from vae_experiments import targets
from vae_experiments.targets import ConfigError as ModelConfigError
from vae_experiments.training.config_checks import (
    ConfigError,
    check_config,
    config_problems,
)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["trainer.gradient_clip_val=-1"],
            "trainer.gradient_clip_val=-1 is invalid: must be null (no clipping) or a number >= 0",
        ),
        (
            ["trainer.gradient_clip_algorithm=l2"],
            "trainer.gradient_clip_algorithm=l2 is invalid: must be one of norm, value",
        ),
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


@pytest.mark.parametrize("config", MODEL_CONFIGS)
def test_every_shipped_model_config_passes(config):
    assert config_problems(compose_config([f"model={config}"])) == []


@pytest.mark.parametrize("config", DATA_CONFIGS)
def test_every_shipped_data_config_passes(config):
    assert config_problems(compose_config([f"data={config}"])) == []


def test_edge_values_that_are_allowed():
    cfg = compose_config(
        [
            "data.batch_size=1",
            "trainer.max_epochs=-1",
            "trainer.gradient_clip_val=0",
            "trainer.gradient_clip_algorithm=value",
        ]
    )
    assert config_problems(cfg) == []


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as error:
        check_config(compose_config(["seed=-1", "test_ckpt=worst"]))
    text = str(error.value)
    assert text.startswith("2 invalid config values:")
    assert "seed=-1 is invalid" in text and "test_ckpt=worst is invalid" in text


def test_conv_network_fails_on_the_data_modules_shape_before_reading_data(tmp_path):
    from vae_experiments.training import train

    cfg = compose_config(
        ["data=synthetic", "data.source.image_shape=[1,2,2]", "model/network=conv"]
    )
    with pytest.raises(
        ModelConfigError, match=r"^model\.network: a conv network cannot take images of shape"
    ):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


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


def test_training_fails_on_a_bad_model_value_before_reading_data(tmp_path):
    from vae_experiments.training import train

    # The model is built before the data is read: reading this folder would fail otherwise.
    cfg = compose_config(
        ["data=image_folder", "data.source.path=/no/such/folder", "model.latent_dim=0"]
    )
    with pytest.raises(ModelConfigError, match=r"^model\.latent_dim=0 is invalid"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
