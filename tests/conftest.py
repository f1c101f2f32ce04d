"""Shared fixtures: composing the real configs, tiny seeded data, fast trainer settings."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from vae_experiments.configs import CONFIG_DIR as PACKAGE_CONFIG_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(PACKAGE_CONFIG_DIR)
MODEL_CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
DATA_CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))

# Overrides that make a training run take seconds on two CPU cores.
FAST = [
    "trainer=cpu",
    "trainer.max_epochs=2",
    "trainer.enable_model_summary=false",
    "trainer.enable_progress_bar=false",
    "data.batch_size=32",
    "model.latent_dim=4",
]


# An MLP body with one hidden layer of 64 units, for any model.
MLP_64 = ["model/network=mlp", "model.network.hidden_dims=[64]"]


def sweep_job(sweep_dir: Path, number: int | str) -> Path:
    """The directory of job ``number`` of a sweep, ``<number>-<what the run is>``."""
    (found,) = Path(sweep_dir).glob(f"{number}-*")
    return found


def compose_config(overrides: list[str] = ()) -> DictConfig:
    """``configs/train.yaml`` composed with overrides, as ``python train.py ...`` would, and
    ``model/likelihood=auto`` replaced by the data's likelihood, as ``train()`` does first (so
    that ``cfg.model`` builds as it is)."""
    from vae_experiments.config_checks import choose_likelihood

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    choose_likelihood(cfg)
    return cfg


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Iterator[Path]:
    """One cache folder for the session ($VAE_CACHE_DIR, subprocesses included): tests never
    write into the user's ~/.cache, and the digits classifier of the sample-quality numbers is
    trained once per session."""
    import os

    folder = tmp_path_factory.mktemp("cache")
    before = os.environ.get("VAE_CACHE_DIR")
    os.environ["VAE_CACHE_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("VAE_CACHE_DIR", None)
    else:
        os.environ["VAE_CACHE_DIR"] = before


@pytest.fixture
def make_config() -> Callable[..., DictConfig]:
    return compose_config


@pytest.fixture
def images() -> torch.Tensor:
    """16 seeded grey images of shape (1, 8, 8) in [0, 1]."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand(16, 1, 8, 8, generator=generator)


def small_model_config(cfg: DictConfig) -> DictConfig:
    """Shrinks a model config so that tests stay fast."""
    with open_dict(cfg):
        if "hidden_dims" in cfg.network:
            cfg.network.hidden_dims = [32]
        if "channels" in cfg.network:
            cfg.network.channels = [8, 16]
    return cfg


def train_run(run_dir: Path, overrides: list[str]) -> Path:
    """Trains in process as ``python train.py`` would (train() saves the run's config.yaml)."""
    from vae_experiments.training import train

    # A stack of latent layers (model=hvae) is sized by model.latent_dims, not FAST's latent_dim.
    stacked = any(o.startswith("model.latent_dims=") for o in overrides)
    fast = [o for o in FAST if not (stacked and o.startswith("model.latent_dim="))]
    cfg = compose_config([*fast, *overrides])
    train(cfg, run_dir)
    return run_dir


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory) -> Callable[[str], Path]:
    """``trained_runs("vae")`` -> the directory of a small model trained on digits for a few
    epochs; trained once per session per name. Names: ``vae`` (MLP, the default likelihood:
    discretized logistic on the grey digits, latent 4), ``ae``
    (MLP, latent 4), ``linear_ae`` (latent 4), ``vae_2d`` and ``ae_2d`` (latent 2)."""
    recipes = {
        "vae": ["model=vae", *MLP_64, "trainer.max_epochs=5"],
        "ae": ["model=ae", *MLP_64, "trainer.max_epochs=5"],
        "linear_ae": ["model=linear_ae", "trainer.max_epochs=5"],
        "vae_2d": ["model=vae", *MLP_64, "model.latent_dim=2"],
        "ae_2d": ["model=ae", *MLP_64, "model.latent_dim=2"],
    }
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            root = tmp_path_factory.mktemp(f"run_{name}")
            cache[name] = train_run(root / "run", [*recipes[name], "logger=none"])
        return cache[name]

    return get
