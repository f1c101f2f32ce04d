"""Config values are checked before any data is read or model built, with messages that name the
key, the bad value and what is allowed. (The model's values are checked by its constructors:
tests/test_models.py.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import DATA_CONFIGS, MODEL_CONFIGS, REPO_ROOT, compose_config
from vae_experiments import targets
from vae_experiments.config_checks import (
    ConfigError,
    check_config,
    config_problems,
)
from vae_experiments.targets import ConfigError as ModelConfigError


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
        (["threads=0"], "threads=0 is invalid: must be auto (the cores this process may use)"),
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_trainer_without_a_gpu_fails_before_any_work(tmp_path):
    from vae_experiments.training import train

    cfg = compose_config(["trainer=gpu", "data=image_folder", "data.source.path=/no/such/folder"])
    with pytest.raises(
        ConfigError, match=r"^trainer\.accelerator=gpu is invalid: torch sees no GPU"
    ):
        train(cfg, tmp_path / "run")  # before the (missing) folder is read
    assert not (tmp_path / "run").exists()


def test_max_epochs_minus_one_says_it_trains_until_stopped(tmp_path, caplog, monkeypatch):
    import importlib

    from vae_experiments.config_checks import trains_until_stopped

    # The module, not the function that vae_experiments.training exports under the same name.
    train_module = importlib.import_module("vae_experiments.training.train")

    assert trains_until_stopped(compose_config(["trainer.max_epochs=-1"]))
    assert not trains_until_stopped(
        compose_config(["trainer.max_epochs=-1", "+trainer.max_steps=5"])
    )
    assert not trains_until_stopped(
        compose_config(["trainer.max_epochs=-1", "+trainer.max_time=00:01:00:00"])
    )
    assert not trains_until_stopped(compose_config([]))

    # train() says it at its start, before any data is read (the build stops it here).
    def stop(*args, **kwargs):
        raise RuntimeError("stopped after the message")

    monkeypatch.setattr(train_module, "instantiate", stop)
    with pytest.raises(RuntimeError, match="stopped after the message"):
        train_module.train(compose_config(["trainer.max_epochs=-1"]), tmp_path / "run")
    assert "trainer.max_epochs=-1: training runs until it is stopped" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_ddp_on_cpu_counts_its_processes():
    from vae_experiments.config_checks import cpu_processes

    assert cpu_processes(compose_config(["trainer=ddp", "trainer.devices=4"])) == 4
    assert (
        cpu_processes(
            compose_config(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"])
        )
        == 2
    )
    assert cpu_processes(compose_config(["trainer=ddp"])) is None  # devices=auto: one on a CPU
    assert cpu_processes(compose_config(["trainer=cpu"])) is None


def imported_modules(importtime_stderr: str) -> set[str]:
    """The modules that ``python -X importtime`` says were imported."""
    return set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", importtime_stderr, re.M))


def train_py_with_importtime(args: list[str], cwd) -> tuple[subprocess.CompletedProcess, set]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(REPO_ROOT / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    modules = imported_modules(result.stderr)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    result.stderr = "\n".join(lines)
    return result, modules


def test_a_mistake_among_the_simple_values_fails_before_torch_is_imported(tmp_path):
    run_dir = tmp_path / "run"
    result, modules = train_py_with_importtime(["threads=0", f"hydra.run.dir={run_dir}"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: threads=0 is invalid: must be auto")
    assert "omegaconf" in modules  # what importtime printed was read
    assert not {"torch", "pytorch_lightning", "sklearn"} & modules
    assert "Seed set" not in result.stdout + result.stderr
    assert not run_dir.exists() or list(run_dir.iterdir()) == []


def test_a_value_a_constructor_refuses_fails_before_lightning_and_seeding(tmp_path):
    run_dir = tmp_path / "run"
    args = ["model.latent_dim=0", f"hydra.run.dir={run_dir}"]
    result, modules = train_py_with_importtime(args, tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: model.latent_dim=0 is invalid: must be an integer >= 1"
    assert "torch" in modules  # the model's constructor checks it, on the meta device
    assert not {"pytorch_lightning", "lightning_fabric", "sklearn"} & modules
    assert "Seed set" not in result.stdout + result.stderr
    assert not run_dir.exists() or list(run_dir.iterdir()) == []


def test_help_lists_the_groups_to_choose_from_each_option_documented(tmp_path):
    result, modules = train_py_with_importtime(["--help"], tmp_path)
    assert result.returncode == 0
    assert not {"torch", "pytorch_lightning"} & modules
    listing = result.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    groups = dict(line.split(": ", 1) for line in listing.splitlines() if ": " in line)
    assert {"model", "model/network", "data", "experiment"} <= set(groups)
    assert not [group for group in groups if group.startswith("_")]  # no internal group
    readme = (REPO_ROOT / "README.md").read_text()
    undocumented = [
        f"{group}={option}"
        for group, options in groups.items()
        for option in options.split(", ")
        if f"`{option}`" not in readme
    ]
    assert undocumented == []


def test_a_fused_optimizer_with_clipping_under_mixed_precision_is_refused_before_training():
    """Lightning refuses it after the run started; optimizer.fused=null (the default) picks the
    unfused implementation there, and an explicit true is refused at once, naming the keys."""
    clipped = ["trainer.precision=bf16-mixed", "trainer.gradient_clip_val=1.0"]
    with pytest.raises(ConfigError) as error:
        check_config(compose_config([*clipped, "optimizer.fused=true"]))
    message = str(error.value)
    assert "optimizer.fused=true is invalid" in message
    assert "trainer.gradient_clip_val=1.0" in message and "optimizer.fused=null" in message
    check_config(compose_config(clipped))  # the default chooses for itself
    check_config(compose_config(["optimizer.fused=true", "trainer.gradient_clip_val=1.0"]))
