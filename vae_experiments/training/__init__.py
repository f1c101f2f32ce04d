"""Lightning and Hydra live here: the LightningModule, callbacks and the training entry point."""

from vae_experiments.training.module import LitModel, NonFiniteLossError
from vae_experiments.training.train import train

__all__ = ["LitModel", "NonFiniteLossError", "train"]
