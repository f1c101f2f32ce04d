"""The one LightningModule: trains any model through its ``loss`` and logs every term."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch

from vae_experiments.models import LatentModel

OptimizerFactory = Callable[..., torch.optim.Optimizer]


class TermMeans:
    """Running image-weighted means of named loss terms, kept on the device: adding a batch
    costs two small kernels and no host sync; the means are read once per logging interval."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._sums: torch.Tensor | None = None  # (num_terms + 1,): weighted sums, then the count

    def reset(self) -> None:
        self._sums = None

    def add(self, terms: Mapping[str, torch.Tensor], batch_size: int) -> None:
        """Adds a batch's terms (each a scalar mean over its ``batch_size`` images)."""
        values = torch.stack([value.detach().float() for value in terms.values()])
        weighted = torch.cat([values * batch_size, values.new_full((1,), batch_size)])
        if self._sums is None:
            self.names = list(terms)
            self._sums = weighted
        else:
            self._sums += weighted

    def pop(self, strategy: Any = None) -> dict[str, torch.Tensor]:
        """The means since the last reset (summed over processes through ``strategy.reduce`` when
        given), and a reset. Empty when nothing was added."""
        if self._sums is None:
            return {}
        sums = self._sums if strategy is None else strategy.reduce(self._sums, reduce_op="sum")
        self._sums = None
        means = sums[:-1] / sums[-1]
        return dict(zip(self.names, means.unbind(), strict=True))


class LitModel(pl.LightningModule):
    """Wraps a :class:`LatentModel` for CPU, GPU and multi-GPU/multi-node training.

    Every term of ``model.loss`` is logged as ``{stage}/{name}`` (``train/loss``, ``val/elbo``, ...):
    training terms every ``trainer.log_every_n_steps`` steps as the mean over those steps,
    validation and test terms once per epoch as the mean over all images of all processes.
    Terms are accumulated on the device, so a step costs no host sync and no logging call.

    Args:
        model: the model to train.
        optimizer: a partial optimizer (Hydra ``_partial_: true``) taking the parameters.
        image_shape: (C, H, W) of the data, stored in checkpoints so a run can be rebuilt.
        lr_scheduler: optional Lightning lr-scheduler dict whose ``scheduler`` is a partial taking
            the optimizer; other keys (``interval``, ``monitor``, ...) are passed to Lightning.
        compile: run the encoder and decoder through ``torch.compile`` (training batches all have
            the same shape; evaluation's last partial batch and no-grad mode compile once more).
        channels_last: store conv weights and input batches in NHWC memory format.
    """

    def __init__(
        self,
        model: LatentModel,
        optimizer: OptimizerFactory,
        image_shape: Sequence[int],
        lr_scheduler: Mapping[str, Any] | None = None,
        compile: bool = False,
        channels_last: bool = False,
    ):
        super().__init__()
        self.channels_last = channels_last
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        if compile:
            # The networks, not the loss: the loss branches on Python values (the step of a KL
            # warm-up, train/eval), which would recompile; the networks see only fixed shapes.
            # Module.compile() compiles in place, so checkpoint keys do not change.
            for name in ("encoder", "decoder"):
                network = getattr(model, name, None)
                if isinstance(network, torch.nn.Module):
                    network.compile()
        self.optimizer_factory = optimizer
        self._means = {stage: TermMeans() for stage in ("train", "val", "test")}
        self.lr_scheduler_config = dict(lr_scheduler) if lr_scheduler else None
        # The composed config is saved by Hydra; the checkpoint needs only the data's shape.
        self.save_hyperparameters({"image_shape": [int(s) for s in image_shape]}, logger=False)

    def _step(self, batch: Sequence[torch.Tensor], stage: str) -> torch.Tensor:
        x = batch[0]
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        training = stage == "train"
        terms = self.model.loss(x, step=self.global_step if training else None)
        self._means[stage].add(terms, x.shape[0])
        if training and self._logs_this_step():
            self._log_means("train", sync=False)
        return terms["loss"]

    def _logs_this_step(self) -> bool:
        """Whether the trainer writes step metrics after this step (every log_every_n_steps)."""
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def _log_means(self, stage: str, sync: bool) -> None:
        """Log the means accumulated in ``stage`` since the last call, then start afresh."""
        means = self._means[stage].pop(self.trainer.strategy if sync else None)
        for name, value in means.items():
            self.log(
                f"{stage}/{name}",
                value,
                prog_bar=name == "loss",
                on_step=stage == "train",
                on_epoch=stage != "train",
                # Already summed over processes; syncing the equal values again is a no-op that
                # keeps Lightning from warning about unsynced epoch metrics.
                sync_dist=sync,
            )

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def on_train_epoch_start(self) -> None:
        self._means["train"].reset()

    def on_validation_epoch_start(self) -> None:
        self._means["val"].reset()

    def on_validation_epoch_end(self) -> None:
        self._log_means("val", sync=True)

    def on_test_epoch_start(self) -> None:
        self._means["test"].reset()

    def on_test_epoch_end(self) -> None:
        self._log_means("test", sync=True)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_config is None:
            return optimizer
        config = dict(self.lr_scheduler_config)
        config["scheduler"] = config["scheduler"](optimizer)
        return {"optimizer": optimizer, "lr_scheduler": config}
