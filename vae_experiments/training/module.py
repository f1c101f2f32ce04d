"""The one LightningModule: trains any model through its ``loss`` and logs every term."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch

from vae_experiments.models import LatentModel

OptimizerFactory = Callable[..., torch.optim.Optimizer]


class LitModel(pl.LightningModule):
    """Wraps a :class:`LatentModel` for CPU, GPU and multi-GPU/multi-node training.

    Every term of ``model.loss`` is logged as ``{stage}/{name}`` (``train/loss``, ``val/elbo``, ...):
    training terms per step (at the trainer's logging interval), validation and test terms as
    epoch means synced across processes.

    Args:
        model: the model to train.
        optimizer: a partial optimizer (Hydra ``_partial_: true``) taking the parameters.
        image_shape: (C, H, W) of the data, stored in checkpoints so a run can be rebuilt.
        lr_scheduler: optional Lightning lr-scheduler dict whose ``scheduler`` is a partial taking
            the optimizer; other keys (``interval``, ``monitor``, ...) are passed to Lightning.
    """

    def __init__(
        self,
        model: LatentModel,
        optimizer: OptimizerFactory,
        image_shape: Sequence[int],
        lr_scheduler: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.lr_scheduler_config = dict(lr_scheduler) if lr_scheduler else None
        # The composed config is saved by Hydra; the checkpoint needs only the data's shape.
        self.save_hyperparameters({"image_shape": [int(s) for s in image_shape]}, logger=False)

    def _step(self, batch: Sequence[torch.Tensor], stage: str) -> torch.Tensor:
        x = batch[0]
        training = stage == "train"
        terms = self.model.loss(x, step=self.global_step if training else None)
        for name, value in terms.items():
            self.log(
                f"{stage}/{name}",
                value,
                on_step=training,
                on_epoch=not training,
                sync_dist=not training,
                prog_bar=name == "loss",
                batch_size=x.shape[0],
            )
        return terms["loss"]

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_config is None:
            return optimizer
        config = dict(self.lr_scheduler_config)
        config["scheduler"] = config["scheduler"](optimizer)
        return {"optimizer": optimizer, "lr_scheduler": config}
