"""Trackers (logger=mlflow, logger=wandb, several at once), what they are told, and the message
when one is not installed."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MLP_64, REPO_ROOT, compose_config, train_run
from vae_experiments.cli.run_dirs import run_name
from vae_experiments.config_checks import check_config, logger_nodes
from vae_experiments.targets import ConfigError
from vae_experiments.training.trackers import tracked_hparams

TINY = [*MLP_64, "trainer.max_epochs=1", "callbacks.latent_samples.enabled=false"]


def test_several_loggers_compose_and_an_old_single_logger_config_still_reads():
    cfg = compose_config(["logger=[tensorboard,csv]"])
    assert list(logger_nodes(cfg)) == ["logger.tensorboard", "logger.csv"]
    assert list(logger_nodes(compose_config(["logger=none"]))) == []
    with_many = logger_nodes(compose_config(["logger=many"]))
    assert set(with_many) == {"logger.tensorboard", "logger.csv", "logger.mlflow"}
    # The config.yaml of a run saved before loggers were named: one node at `logger`.
    old = compose_config(["logger=none"])
    old.logger = {"_target_": "pytorch_lightning.loggers.CSVLogger", "name": "csv"}
    assert list(logger_nodes(old)) == ["logger"]


def test_a_tracker_that_is_not_installed_fails_with_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "mlflow" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    cfg = compose_config(["logger=[tensorboard,mlflow]"])
    with pytest.raises(ConfigError, match=r'logger\.mlflow\._target_=.*pip install "vae-'):
        check_config(cfg, lightning=False)  # the early check, before Lightning is imported


def test_hparams_are_the_settings_that_tell_runs_apart():
    cfg = compose_config(["model=linear_ae", "optimizer.lr=0.01", "compile=true"])
    choices = {"model": "linear_ae", "data": "digits", "logger": "tensorboard"}
    hparams = tracked_hparams(cfg, choices, {"optimizer.lr": 0.01, "compile": True})
    assert list(hparams)[:2] == ["model", "data"]  # the choices first, as columns
    assert hparams["model"] == "linear_ae" and "logger" not in hparams
    assert hparams["optimizer.lr"] == 0.01 and hparams["model.latent_dim"] == 16
    assert hparams["compile"] is True  # overridden on the command line
    assert hparams["trainer.max_epochs"] == 30 and hparams["seed"] == 0
    assert not [k for k in hparams if k.startswith("callbacks.") or k.endswith("_target_")]
    assert "trainer.enable_progress_bar" not in hparams and "channels_last" not in hparams


def test_mlflow_run_reads_back_with_the_client(tmp_path, caplog):
    """Also: epochs shorter than trainer.log_every_n_steps (20) still get a train/* point each,
    and a line each in the run's log."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    caplog.set_level(logging.INFO, logger="vae_experiments.training.callbacks")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_dir = train_run(
        tmp_path / "14-03-12-vae-digits",
        [
            "model=vae",
            *TINY,
            "trainer.max_epochs=2",
            "+trainer.limit_train_batches=3",
            "logger=[tensorboard,mlflow]",
            f"logger.mlflow.tracking_uri={uri}",
            f"logger.mlflow.artifact_location={tmp_path}/artifacts",
        ],
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert list((run_dir / "tensorboard").glob("events.*"))  # both loggers wrote
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("vae-experiments")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "14-03-12-vae-digits" and run.info.status == "FINISHED"
    assert run.data.params["model.latent_dim"] == "4"
    assert run.data.params["optimizer.lr"] == "0.001"
    assert run.data.params["callbacks.checkpoint.mode"] == "min"  # the whole flattened config
    assert run.data.metrics["test/elbo"] == pytest.approx(metrics["test/elbo"], rel=1e-6)
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == [2, 5]  # the last step of each 3-step epoch
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split(" (")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert "train/loss=" in lines[0] and "val/loss=" in lines[0] and "val/kl=" in lines[0]
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert "images/reconstructions.png" in images and "images/samples.png" in images
    local = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == metrics


def test_wandb_runs_offline_without_an_api_key(tmp_path):
    pytest.importorskip("wandb")
    # In a process of its own, as a user runs it: W&B's service writes the run's records when
    # the process ends, which inside a long test process depends on what ran before.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path / "home"), WANDB_SILENT="true")  # no ~/.netrc login
    run_dir = tmp_path / "14-03-12-ae-digits"
    command = [sys.executable, str(REPO_ROOT / "train.py"), "model=ae", *TINY, "logger=wandb"]
    subprocess.run(
        [*command, f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, check=True, timeout=300
    )
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    # The run's records (protobuf, read by `wandb sync`): its name, config, metrics and images.
    (records,) = offline.glob("run-*.wandb")
    data = records.read_bytes()
    assert b"14-03-12-ae-digits" in data
    assert b"model.latent_dim" in data and b"callbacks.checkpoint.mode" in data  # whole config
    for key in (b"train/loss", b"val/loss", b"test/loss", b"images/reconstructions"):
        assert key in data, key
    assert list((offline / "files" / "media" / "images").rglob("reconstructions*.png"))


def test_run_names_say_what_the_run_is():
    overrides = ["model.latent_dim=32", "logger=mlflow", "hydra.run.dir=x", "+optimizer.lr=1e-3"]
    assert run_name("vae", "fashion_mnist", overrides) == "vae-fashion_mnist-latent_dim=32-lr=1e-3"
    assert run_name("ae", "digits", ["model/network=mlp", "model.network.hidden_dims=[8,16]"]) == (
        "ae-digits-network=mlp-hidden_dims=_8_16_"
    )
    assert len(run_name("vae", "digits", [f"model.k{i}={i}" for i in range(100)])) <= 120
    sampled = ["model.beta=3.781904084470194", "optimized_metric=test/elbo", "optimizer.lr=1e-3"]
    assert run_name("vae", "digits", sampled) == "vae-digits-beta=3.782-lr=1e-3"


def test_tensorboard_files_lightnings_epoch_after_the_loss_terms(tmp_path):
    """Lightning adds ``epoch`` to every logged set; as a bare card it would open the Scalars tab
    ahead of test/, train/ and val/."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vae_experiments.training.trackers import TensorBoardLogger

    logger = TensorBoardLogger(str(tmp_path), name="tensorboard", version="")
    logger.log_metrics({"train/loss": 2.0, "epoch": 1}, step=5)
    logger.finalize("success")
    scalars = EventAccumulator(str(tmp_path / "tensorboard")).Reload().Tags()["scalars"]
    assert sorted(scalars) == ["train/loss", "trainer/epoch"]
    assert compose_config([]).logger.tensorboard._target_.endswith("trackers.TensorBoardLogger")
