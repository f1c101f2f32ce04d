"""Optimizer and scheduler settings changed on resume take effect.

A checkpoint restores the optimizer's param groups and the scheduler's state as they were, so
``resume=DIR optimizer.lr=1e-4`` would record the new lr in config.yaml and keep training at the
old one (and a cosine schedule would keep the ``T_max`` of the old ``trainer.max_epochs``).
Every checkpoint therefore carries the settings the run's config gave (:func:`configured_settings`,
read from an optimizer and scheduler built on a dummy parameter, so they are the config's values
and not the state the schedule has reached); when a run continues from it, the settings that
differ between that record and the current config are applied to the restored optimizer and
scheduler (:func:`apply_changed_settings`). Settings that did not change keep the restored state,
so a decayed learning rate is not reset to its starting value.

Plain torch: no Lightning.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

#: Scheduler state-dict entries that are the schedule's position or history, not settings.
SCHEDULER_STATE = frozenset({"base_lrs", "last_epoch", "verbose", "optimizer"})
#: Optimizer arguments that choose how torch computes the same update, not what it is: not
#: applied to a restored optimizer (its state is laid out for the implementation it ran, e.g.
#: the step counts of a fused optimizer live on the parameters' device).
IMPLEMENTATION_SETTINGS = frozenset({"fused", "foreach", "capturable", "differentiable"})


def build_optimizer(
    optimizer_factory: Callable[..., torch.optim.Optimizer],
    parameters: Iterable[torch.nn.Parameter],
    fused_allowed: bool = True,
) -> torch.optim.Optimizer:
    """The run's optimizer over ``parameters``, fused where the config leaves it open.

    An optimizer with a fused implementation (Adam, AdamW, SGD, ...: one kernel per parameter
    tensor for the whole update, on CPU and GPU since torch 2.4) whose ``fused`` the config
    leaves null gets ``fused=True`` when ``fused_allowed`` (False where Lightning refuses a fused
    optimizer: gradient clipping under mixed precision). The Burda preset's step took 2.7 ms
    fused against 3.7 ms with torch's default here. ``fused: true`` or ``false`` in the config is
    passed as it is.
    """
    given = getattr(optimizer_factory, "keywords", {}) or {}
    target = getattr(optimizer_factory, "func", optimizer_factory)
    accepts = "fused" in inspect.signature(target).parameters if inspect.isclass(target) else False
    if accepts and given.get("fused") is None and fused_allowed:
        return optimizer_factory(parameters, fused=True)
    return optimizer_factory(parameters)


def _plain(value: Any) -> Any:
    """Tuples as lists and tensors as numbers, so that a value read back from a checkpoint
    compares equal to the one built from the config."""
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def configured_settings(
    optimizer_factory: Callable[..., torch.optim.Optimizer],
    scheduler_factory: Callable[[torch.optim.Optimizer], Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """The optimizer's and scheduler's settings as the config gives them.

    Returns:
        ``{"optimizer": {"lr": 1e-3, "weight_decay": 0.0, ...}, "scheduler": {"T_max": 20,
        ...}}`` (``scheduler`` empty without one): plain numbers, lists, strings and bools.
    """
    optimizer = optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
    settings = {
        "optimizer": {
            key: _plain(value)
            for key, value in optimizer.param_groups[0].items()
            if key not in ("params", "initial_lr")
        },
        "scheduler": {},
    }
    if scheduler_factory is not None:
        state = scheduler_factory(optimizer).state_dict()
        settings["scheduler"] = {
            key: _plain(value)
            for key, value in state.items()
            if not key.startswith("_") and key not in SCHEDULER_STATE
        }
    return settings


def changed_settings(
    before: Mapping[str, Mapping[str, Any]], now: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, tuple[Any, Any]]]:
    """``{"optimizer": {"lr": (old, new)}, "scheduler": {...}}``: the settings that differ."""
    return {
        part: {
            key: (before.get(part, {}).get(key), value)
            for key, value in now.get(part, {}).items()
            if key in before.get(part, {}) and _plain(before[part][key]) != value
        }
        for part in ("optimizer", "scheduler")
    }


def apply_changed_settings(
    before: Mapping[str, Mapping[str, Any]],
    now: Mapping[str, Mapping[str, Any]],
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[Any] = (),
    scheduler_factory: Callable[[torch.optim.Optimizer], Any] | None = None,
) -> list[str]:
    """Applies to restored optimizers and schedulers the settings that changed from ``before``
    (the record in the checkpoint) to ``now`` (the current config).

    Optimizer settings (``lr``, ``weight_decay``, ``betas``, ...) are set in every param group,
    scheduler settings (``T_max``, ``gamma``, ...) on the scheduler. The learning rate then
    follows the schedule as configured now: a schedule that depends only on its step count
    (cosine, step, exponential, ...) is replayed with the new settings up to the restored step
    count (``resume=DIR trainer.max_epochs=40`` on a cosine run that ended at lr 0 continues
    from where a 40-epoch cosine stands); ``ReduceLROnPlateau``, whose lr depends on the
    validation history, has its current lr scaled by new lr / old lr.

    Returns:
        One ``"optimizer.lr: 0.001 -> 0.0001"`` line per applied setting.
    """
    changes = changed_settings(before, now)
    for key in IMPLEMENTATION_SETTINGS:
        changes["optimizer"].pop(key, None)
    applied = [
        f"optimizer.{key}: {old} -> {new}" for key, (old, new) in changes["optimizer"].items()
    ]
    applied += [
        f"scheduler.scheduler.{key}: {old} -> {new}"
        for key, (old, new) in changes["scheduler"].items()
    ]
    if not applied:
        return applied
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            for key, (old, new) in changes["optimizer"].items():
                if key == "lr":
                    group["lr"] = group["lr"] * new / old if old else new
                    if "initial_lr" in group:
                        group["initial_lr"] = new
                elif key in group:
                    group[key] = tuple(new) if isinstance(group[key], tuple) else new
    for scheduler in schedulers:
        for key, (_, new) in changes["scheduler"].items():
            if hasattr(scheduler, key):
                setattr(scheduler, key, new)
        if "lr" in changes["optimizer"] and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [changes["optimizer"]["lr"][1] for _ in scheduler.base_lrs]
        if scheduler_factory is not None and not isinstance(
            scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau
        ):
            _replay(scheduler, scheduler_factory)
    return applied


def _replay(scheduler: Any, scheduler_factory: Callable[[torch.optim.Optimizer], Any]) -> None:
    """Sets the lr of ``scheduler``'s param groups to what a scheduler built now (the current
    settings and ``base_lrs``) gives after the same number of steps."""
    groups = scheduler.optimizer.param_groups
    dummy = torch.optim.SGD(
        [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in scheduler.base_lrs]
    )
    fresh = scheduler_factory(dummy)
    for _ in range(int(scheduler.last_epoch)):
        dummy.step()  # no gradients: changes nothing, and keeps torch's step-order check quiet
        fresh.step()
    for group, replayed in zip(groups, dummy.param_groups, strict=True):
        group["lr"] = replayed["lr"]
