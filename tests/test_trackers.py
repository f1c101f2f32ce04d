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
from omegaconf import open_dict

from tests.conftest import MLP_64, REPO_ROOT, compose_config, sweep_job, train_run
from vae_experiments.cli.run_dirs import run_name
from vae_experiments.config_checks import check_config, logger_nodes
from vae_experiments.runs import EVENT_FILE_GLOB, read_metrics, tensorboard_dir
from vae_experiments.targets import ConfigError
from vae_experiments.training.trackers import TensorBoardLogger, build_loggers, tracked_hparams

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
    assert list(run_dir.glob(EVENT_FILE_GLOB))  # both loggers wrote
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("vae-experiments")
    # MLflow 3's UI files an experiment of this kind under model training, not GenAI evaluation.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
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

    logger = TensorBoardLogger(str(tmp_path), name="tensorboard", version="")
    logger.log_metrics({"train/loss": 2.0, "epoch": 1}, step=5)
    logger.finalize("success")
    scalars = EventAccumulator(str(tmp_path / "tensorboard")).Reload().Tags()["scalars"]
    assert sorted(scalars) == ["train/loss", "trainer/epoch"]
    assert compose_config([]).logger.tensorboard._target_.endswith("trackers.TensorBoardLogger")


def test_tensorboard_tags_units_and_writes_settings_without_metrics_at_step_0(tmp_path):
    (logger,) = build_loggers(compose_config(["model=ae", *MLP_64]), tmp_path)
    assert Path(logger.log_dir) == tmp_path and logger.unit == "squared_error"
    logger.log_metrics({"val/loss": 2.0, "val/recon_mse": 0.1, "epoch": 0}, step=7)
    logger.log_metrics({"test/loss": 1.5, "test/recon_mse": 0.1, "epoch": 0}, step=9)
    logger.log_hyperparams({"model": "ae", "model.latent_dim": 4})  # what report_run gives
    logger.save()
    logger.finalize("success")
    events = events_of(tmp_path)
    assert set(events.Tags()["scalars"]) == {
        *("val/loss [squared_error]", "val/recon_mse", "trainer/epoch"),
        *("test/loss [squared_error]", "test/recon_mse"),
    }
    assert [point.step for point in events.Scalars("test/loss [squared_error]")] == [9]
    sessions = events.PluginTagToContent("hparams")
    assert set(sessions) == {"_hparams_/session_start_info", "_hparams_/session_end_info"}
    assert [p.name for p in tmp_path.iterdir() if not p.match(EVENT_FILE_GLOB)] == []  # no yaml


def test_hparams_tab_marks_the_settings_that_differ_and_puts_them_first(tmp_path):
    for name, latent_dim in (("a", 2), ("b", 8)):
        logger = TensorBoardLogger(str(tmp_path / name), name="", version="")
        logger.log_metrics({"test/recon_mse": 0.1}, step=3)
        logger.log_hyperparams({"data": "digits", "model": "vae", "model.latent_dim": latent_dim})
        logger.finalize("success")
    _, experiment = tensorboard_view(tmp_path)
    assert [(info.name, info.differs) for info in experiment.hparam_infos] == [
        ("model.latent_dim", True),
        ("data", False),
        ("model", False),
    ]


def test_a_run_made_before_keeps_its_events_in_its_tensorboard_folder(tmp_path):
    """Resuming (or evaluating) a run whose events are in ``tensorboard/`` writes there: its
    curves stay one TensorBoard run. Its config.yaml names that folder as the logger's."""
    old = tmp_path / "tensorboard"
    old.mkdir()
    (old / "events.out.tfevents.1796000000.host.123.0").write_bytes(b"")
    cfg = compose_config([])
    with open_dict(cfg):
        cfg.logger.tensorboard.name = "tensorboard"
    assert tensorboard_dir(tmp_path) == old
    (logger,) = build_loggers(cfg, tmp_path)
    assert Path(logger.log_dir) == old


# --------------------------------------------------------------------------------------------
# TensorBoard, as a sweep's runs are compared in it


def tensorboard_view(logdir: Path):
    """What TensorBoard serves for ``tensorboard --logdir <logdir>``: its runs (event files by
    folder) and the HPARAMS tab's experiment (columns, whether each differs between runs, in the
    order the tab shows them), from TensorBoard's own backend."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    tb = base_plugin.TBContext(logdir=str(logdir), multiplexer=multiplexer, data_provider=provider)
    request = api_pb2.GetExperimentRequest(hparams_limit=1000)  # what the tab asks for
    handler = get_experiment.Handler(
        context.RequestContext(), backend_context.Context(tb), "", request
    )
    return multiplexer, handler.run()


@pytest.fixture(scope="module")
def ae_vae_sweep(tmp_path_factory) -> Path:
    """``python train.py -m model=ae,vae``, tiny, as a user types it: an AE (squared error) and
    a VAE (nats of the discretized logistic) in one sweep directory."""
    root = tmp_path_factory.mktemp("ae_vae")
    sweep_dir = root / "multirun"
    command = [sys.executable, str(REPO_ROOT / "train.py"), "-m", "model=ae,vae", *TINY]
    command += ["trainer.enable_progress_bar=false", f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, cwd=root, env=env, check=True, timeout=300, capture_output=True)
    return sweep_dir


@pytest.mark.slow  # a sweep of two tiny runs, as a subprocess (15-35 s)
def test_tensorboard_names_each_run_after_its_directory(ae_vae_sweep):
    multiplexer, _ = tensorboard_view(ae_vae_sweep)
    jobs = [sweep_job(ae_vae_sweep, n) for n in (0, 1)]
    assert sorted(multiplexer.Runs()) == [job.name for job in jobs]
    assert jobs[0].name.startswith("0-ae-digits") and jobs[1].name.startswith("1-vae-digits")
    for job in jobs:  # the events in the run directory itself; nothing of Lightning's beside
        assert not (job / "tensorboard").exists() and not (job / "hparams.yaml").exists()


def events_of(run_dir: Path):
    """The run's TensorBoard events, loaded (scalars in full)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(tensorboard_dir(run_dir)), size_guidance={"scalars": 0}).Reload()


@pytest.mark.slow  # a sweep of two tiny runs, as a subprocess (15-35 s)
def test_hparams_columns_show_what_differs_between_runs_first(ae_vae_sweep):
    _, experiment = tensorboard_view(ae_vae_sweep)
    columns = [(info.name, info.differs) for info in experiment.hparam_infos]
    # The tab ticks the first five columns: the settings that differ, then the others by name.
    assert columns[:2] == [("model", True), ("model/likelihood", True)]
    assert len(columns) > 20 and not any(differs for _, differs in columns[2:])
    likelihood = next(i for i in experiment.hparam_infos if i.name == "model/likelihood")
    assert sorted(likelihood.domain_discrete) == ["discretized_logistic", "squared_error"]
    # Each run writes its own settings only: with a run's experiment summary TensorBoard would
    # take that one run's columns for all, none marked as differing.
    for n in (0, 1):
        tags = set(events_of(sweep_job(ae_vae_sweep, n)).PluginTagToContent("hparams"))
        assert tags == {"_hparams_/session_start_info", "_hparams_/session_end_info"}


@pytest.mark.slow  # a sweep of two tiny runs, as a subprocess (15-35 s)
def test_test_metrics_are_one_point_at_the_last_step(ae_vae_sweep):
    for job in (sweep_job(ae_vae_sweep, n) for n in (0, 1)):
        steps = read_metrics(job)["steps"]
        events = events_of(job)
        test_tags = [tag for tag in events.Tags()["scalars"] if tag.startswith("test/")]
        assert len(test_tags) >= 3
        for tag in test_tags:
            assert [point.step for point in events.Scalars(tag)] == [steps], tag


@pytest.mark.slow  # a sweep of two tiny runs, as a subprocess (15-35 s)
def test_unlike_units_get_a_chart_each(ae_vae_sweep):
    """An AE's squared error and a VAE's nats never share a chart; what every model logs in one
    unit (recon_mse, a squared error per image) does."""
    ae = set(events_of(sweep_job(ae_vae_sweep, 0)).Tags()["scalars"])
    vae = set(events_of(sweep_job(ae_vae_sweep, 1)).Tags()["scalars"])
    assert {"val/loss [squared_error]", "test/recon [squared_error]"} <= ae
    assert {"val/loss [discretized_logistic]", "val/elbo [discretized_logistic]"} <= vae
    assert {"val/kl", "test/kl"} <= vae  # nats of the latents in every VAE
    assert ae & vae == {*(f"{s}/recon_mse" for s in ("train", "val", "test")), "trainer/epoch"}
