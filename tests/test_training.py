"""Training end to end, in process: every model trains, and its run directory holds what it should."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import FAST, MODEL_CONFIGS, compose_config, train_run
from vae_experiments import load_run, read_metrics
from vae_experiments.models.base import squared_error

SMALL = ["model.hidden_dims=[32]", "model.conv_channels=[8,16]"]


def run(tmp_path: Path, overrides: list[str], name: str = "run") -> tuple[dict, Path]:
    """Trains as ``python train.py`` would; returns its metrics and run directory."""
    run_dir = train_run(tmp_path / name, overrides)
    return read_metrics(run_dir), run_dir


def expected_test_metrics(model_name: str) -> set[str]:
    base = {"test/loss", "test/recon", "test/recon_mse"}
    return base | {"test/kl", "test/elbo"} if model_name == "vae" else base


def load_test_images(cfg_overrides: list[str]) -> torch.Tensor:
    datamodule = instantiate(compose_config([*FAST, *cfg_overrides]).data)
    datamodule.setup()
    return datamodule.to_float(datamodule.splits["test"].images)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_each_model_trains_and_writes_its_run(tmp_path, name):
    overrides = [f"model={name}", *([] if name == "linear_ae" else SMALL)]
    metrics, run_dir = run(tmp_path, overrides)

    expected = expected_test_metrics(name)
    assert set(metrics) == expected | {"epochs", "steps", "train_seconds", "world_size"}
    assert metrics["epochs"] == 2 and metrics["world_size"] == 1
    # digits: 1797 images, 20% test, 10% of the rest for validation; full batches of 32.
    assert metrics["steps"] == 2 * (1294 // 32)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())

    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "images" / "reconstructions.png").is_file()
    assert (run_dir / "images" / "samples.png").is_file() == (name == "vae")

    # The logged test metric is what the reloaded model gives on the test split.
    model, cfg = load_run(run_dir)
    assert cfg.model._target_.endswith("build_vae" if name == "vae" else "build_autoencoder")
    assert not model.training
    x = load_test_images(overrides)
    with torch.no_grad():
        recon_mse = squared_error(x, model.reconstruct(x)).mean()
    assert float(recon_mse) == pytest.approx(metrics["test/recon_mse"], rel=1e-4)

    if name == "vae":
        assert metrics["test/elbo"] == pytest.approx(
            -(metrics["test/recon"] + metrics["test/kl"]), rel=0.05
        )


def test_training_lowers_the_test_error(tmp_path):
    overrides = ["model=ae", "model.arch=mlp", "model.hidden_dims=[64]", "trainer.max_epochs=3"]
    metrics, _ = run(tmp_path, overrides)
    untrained = instantiate(compose_config(overrides).model, image_shape=[1, 8, 8], _convert_="all")
    x = load_test_images(overrides)
    with torch.no_grad():
        before = float(squared_error(x, untrained.eval().reconstruct(x)).mean())
    assert metrics["test/recon_mse"] < 0.5 * before


def test_same_seed_same_run_and_other_seed_other_run(tmp_path):
    overrides = ["model=vae", *SMALL]
    first, _ = run(tmp_path, [*overrides, "seed=3"], "a")
    second, _ = run(tmp_path, [*overrides, "seed=3"], "b")
    other, _ = run(tmp_path, [*overrides, "seed=4"], "c")
    for metrics in (first, second, other):
        metrics.pop("train_seconds")
    assert first == second
    assert first != other


def test_tensorboard_gets_scalars_image_grids_and_hparams(tmp_path):
    _, run_dir = run(tmp_path, ["model=vae", *SMALL])
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    tags = events.Tags()
    for stage in ["train", "val", "test"]:
        for term in ["loss", "recon", "recon_mse", "kl", "elbo"]:
            assert f"{stage}/{term}" in tags["scalars"], f"{stage}/{term}"
    assert {"images/reconstructions", "images/samples"} <= set(tags["images"])
    # Two validation epochs, two grids each (the sanity check is not logged).
    assert len(events.Images("images/samples")) == 2
    hparams_files = list((run_dir / "tensorboard").glob("events.*"))
    assert any(b"_hparams_/session_start_info" in f.read_bytes() for f in hparams_files)
    assert any(b"model.latent_dim" in f.read_bytes() for f in hparams_files)


def test_other_loggers_and_a_scheduler(tmp_path):
    metrics, run_dir = run(tmp_path, ["model=linear_ae", "logger=csv", "scheduler=cosine"], "csv")
    assert (run_dir / "csv" / "metrics.csv").is_file()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 2
    _, run_dir = run(tmp_path, ["model=linear_ae", "logger=none"], "none")
    assert (run_dir / "metrics.json").is_file()
    assert not (run_dir / "tensorboard").exists()


def test_load_run_accepts_a_checkpoint_path_and_last(tmp_path):
    _, run_dir = run(tmp_path, ["model=linear_ae"])
    best, _ = load_run(run_dir)
    last, _ = load_run(run_dir, checkpoint="last")
    from_file, _ = load_run(run_dir / "checkpoints" / "last.ckpt")
    for key, value in last.state_dict().items():
        assert torch.equal(value, from_file.state_dict()[key])
    assert set(best.state_dict()) == set(last.state_dict())
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_run(tmp_path)


def test_metrics_file_is_flat_json(tmp_path):
    _, run_dir = run(tmp_path, ["model=linear_ae"])
    data = json.loads((run_dir / "metrics.json").read_text())
    assert all(isinstance(v, int | float) for v in data.values())


@pytest.mark.parametrize(
    "override, choices",
    [
        ("model=vea", ["ae", "denoising_ae", "linear_ae", "vae"]),
        ("data=mnits", ["digits", "mnist", "fashion_mnist", "celeba", "image_folder"]),
        ("trainer=tpu", ["cpu", "ddp", "default", "gpu"]),
    ],
)
def test_unknown_group_option_lists_the_available_ones(override, choices):
    with pytest.raises(MissingConfigException) as error:
        compose_config([override])
    for choice in choices:
        assert choice in str(error.value)
