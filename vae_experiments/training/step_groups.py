"""Groups of training batches: how many optimizer steps one pass of Lightning's per-batch loop
takes, and when batches cannot be grouped.

Lightning's training loop costs about 1.5-3 ms per batch on a CPU (hooks of every callback,
automatic optimization's closure, the logger connector, the data fetcher; BENCHMARKS.md), as much
as the arithmetic of a small MLP VAE's step. With groups, the data module yields S batches at once
and :class:`~vae_experiments.training.module.LitModel` takes S - 1 of their optimizer steps itself,
in Lightning's order, and hands the last to Lightning: the loop's cost is paid once per S steps,
the weights are the same bit for bit, and everything that happens between batches (checkpoints,
signals, validation at the epoch's end, epoch lr schedulers) still happens, because groups end at
the epoch's end. Groups end at multiples of S counted from the epoch's start, S dividing
``log_every_n_steps``: a logging step is a group's last step when the epochs before it were
multiples of S long; otherwise its point is written at the end of the group that holds it.

What a group leaves out, per step: Lightning's per-step hooks of callbacks
(``on_train_batch_start/end``, ``on_before_backward``, ``on_after_backward``,
``on_before_optimizer_step``, ``on_before_zero_grad``) run once per group, not once per step.
``steps_per_group=1`` brings back every hook at every step.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from vae_experiments.data.batches import TensorImages
from vae_experiments.models.adversary import has_adversary

log = logging.getLogger(__name__)

#: Precisions whose backward goes through a gradient scaler (Lightning's, per step).
SCALED_PRECISIONS = frozenset({"16-mixed", "16"})


def _optimizer_class(optimizer_factory: Any) -> type | None:
    """The class a (partial) optimizer factory builds, when it can be told without building:
    ``functools.partial`` and :func:`vae_experiments.targets.instantiate`'s partials name it
    as ``func``."""
    for _ in range(8):  # partials of partials
        if isinstance(optimizer_factory, type):
            return optimizer_factory
        optimizer_factory = getattr(optimizer_factory, "func", None)
    return None


def largest_divisor_at_most(number: int, limit: int) -> int:
    """The largest divisor of ``number`` (>= 1) that is at most ``limit`` (>= 1)."""
    return max(d for d in range(1, max(1, min(number, limit)) + 1) if number % d == 0)


def ungrouped_because(
    trainer: pl.Trainer,
    train_split: Dataset,
    optimizer_factory: Any,
    lr_scheduler: Mapping[str, Any] | None,
    model: Any = None,
) -> str | None:
    """Why this run's batches cannot be grouped (each reason is something a group's own steps
    would do differently from Lightning's), or None when they can."""
    if has_adversary(model):
        return "the model has an adversary: its training step steps two optimizers itself"
    if not isinstance(train_split, TensorImages):
        return "the training images are read from files batch by batch"
    if trainer.world_size > 1:
        return "DDP synchronises gradients in Lightning's backward"
    if trainer.accumulate_grad_batches != 1:
        return f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}"
    if str(trainer.precision) in SCALED_PRECISIONS:
        return f"trainer.precision={trainer.precision} scales the loss per step"
    if trainer.val_check_interval != 1.0 or trainer.check_val_every_n_epoch is None:
        return "validation runs within epochs (trainer.val_check_interval)"
    if trainer.overfit_batches or trainer.fast_dev_run:
        return "trainer.overfit_batches or trainer.fast_dev_run is set"
    if lr_scheduler is not None and lr_scheduler.get("interval", "epoch") != "epoch":
        return f"the lr scheduler steps every {lr_scheduler.get('interval')}"
    optimizer_class = _optimizer_class(optimizer_factory)
    if optimizer_class is None or issubclass(optimizer_class, torch.optim.LBFGS):
        return "the optimizer evaluates the loss itself (a closure)"
    return None


def steps_per_group(
    most: int,
    trainer: pl.Trainer,
    train_split: Dataset,
    optimizer_factory: Any,
    lr_scheduler: Mapping[str, Any] | None,
    model: Any = None,
) -> int:
    """Optimizer steps per group of batches for this run: the largest divisor of
    ``trainer.log_every_n_steps`` up to ``most`` (the config's ``steps_per_group``), or 1 when
    :func:`ungrouped_because` gives a reason (logged)."""
    if most <= 1:
        return 1
    reason = ungrouped_because(trainer, train_split, optimizer_factory, lr_scheduler, model)
    if reason is not None:
        log.info("steps_per_group=%d: one step per pass of Lightning's loop, as %s", most, reason)
        return 1
    return largest_divisor_at_most(int(trainer.log_every_n_steps), most)
