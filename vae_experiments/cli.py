"""Command-line entry points (Hydra)."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    """``python train.py model=vae data=digits ...``: trains one model; returns its test loss
    (the value Hydra's sweepers minimise)."""
    from vae_experiments.training import train  # heavy imports after Hydra has parsed arguments

    metrics = train(cfg, HydraConfig.get().runtime.output_dir)
    return metrics["test/loss"]
