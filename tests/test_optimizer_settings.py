"""Optimizer and scheduler settings changed on resume take effect (plain torch)."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from vae_experiments.training.optimizer_settings import (
    apply_changed_settings,
    build_optimizer,
    configured_settings,
)


def adam(lr: float = 1e-3, weight_decay: float = 0.0):
    return functools.partial(torch.optim.Adam, lr=lr, weight_decay=weight_decay)


def cosine(t_max: int):
    return functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=t_max)


def trained(optimizer_factory, scheduler_factory, epochs: int):
    """An optimizer and scheduler stepped ``epochs`` times, as a checkpoint would restore."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = optimizer_factory([weight])
    scheduler = scheduler_factory(optimizer) if scheduler_factory else None
    for _ in range(epochs):
        weight.grad = torch.ones(3)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return optimizer, scheduler


def test_settings_are_the_configs_values_not_the_schedules_position():
    settings = configured_settings(adam(lr=0.01, weight_decay=0.1), cosine(10))
    assert settings["optimizer"]["lr"] == 0.01 and settings["optimizer"]["weight_decay"] == 0.1
    assert settings["optimizer"]["betas"] == [0.9, 0.999]
    assert settings["scheduler"]["T_max"] == 10 and "last_epoch" not in settings["scheduler"]
    assert configured_settings(adam())["scheduler"] == {}


def test_a_changed_lr_and_weight_decay_replace_the_restored_ones():
    before = configured_settings(adam(lr=1e-3))
    optimizer, _ = trained(adam(lr=1e-3), None, epochs=3)
    now = configured_settings(adam(lr=1e-4, weight_decay=0.01))
    applied = apply_changed_settings(before, now, [optimizer])
    assert optimizer.param_groups[0]["lr"] == 1e-4
    assert optimizer.param_groups[0]["weight_decay"] == 0.01
    assert applied == ["optimizer.lr: 0.001 -> 0.0001", "optimizer.weight_decay: 0.0 -> 0.01"]


def test_unchanged_settings_keep_the_restored_state():
    before = configured_settings(adam(), cosine(10))
    optimizer, scheduler = trained(adam(), cosine(10), epochs=4)
    decayed = optimizer.param_groups[0]["lr"]
    assert apply_changed_settings(before, before, [optimizer], [scheduler], cosine(10)) == []
    assert optimizer.param_groups[0]["lr"] == decayed < 1e-3


def test_a_cosine_run_trained_on_follows_the_longer_schedule():
    """A 2-epoch cosine run ends at lr 0; raised to 4 epochs (T_max follows max_epochs) with
    another lr, it continues where a 4-epoch cosine at the new lr stands."""
    before = configured_settings(adam(), cosine(2))
    optimizer, scheduler = trained(adam(), cosine(2), epochs=2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)

    now = configured_settings(adam(lr=1e-4), cosine(4))
    apply_changed_settings(before, now, [optimizer], [scheduler], cosine(4))
    assert scheduler.T_max == 4 and scheduler.base_lrs == [1e-4]
    for epoch in (2, 3, 4):
        expected = 1e-4 * (1 + math.cos(math.pi * epoch / 4)) / 2
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12), epoch
        optimizer.step()
        scheduler.step()


def test_plateau_scales_the_lr_it_reached():
    plateau = functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, factor=0.1)
    before = configured_settings(adam(lr=1e-3), plateau)
    optimizer, scheduler = trained(adam(lr=1e-3), None, epochs=1)
    scheduler = plateau(optimizer)
    optimizer.param_groups[0]["lr"] = 1e-4  # reduced once
    apply_changed_settings(
        before, configured_settings(adam(lr=2e-3), plateau), [optimizer], [scheduler], plateau
    )
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)


def test_adam_is_fused_where_the_config_leaves_it_open_and_lightning_allows_it():
    from tests.conftest import compose_config
    from vae_experiments.targets import instantiate

    weight = [torch.nn.Parameter(torch.ones(3))]
    factory = instantiate(compose_config([]).optimizer, key="optimizer")  # optimizer=adam
    assert factory.keywords["fused"] is None  # the config leaves it open
    assert build_optimizer(factory, weight).param_groups[0]["fused"] is True
    refused = build_optimizer(factory, weight, fused_allowed=False)
    assert not refused.param_groups[0]["fused"]
    off = instantiate(compose_config(["optimizer.fused=false"]).optimizer, key="optimizer")
    assert build_optimizer(off, weight).param_groups[0]["fused"] is False
    lbfgs = instantiate(compose_config(["optimizer=lbfgs"]).optimizer, key="optimizer")
    assert "fused" not in build_optimizer(lbfgs, weight).param_groups[0]  # has no such argument
    # The same update as torch's default implementation, to float precision.
    plain, fused = (
        adam()(weight),
        build_optimizer(factory, [w := torch.nn.Parameter(torch.ones(3))]),
    )
    for optimizer, parameter in ((plain, weight[0]), (fused, w)):
        for _ in range(3):
            parameter.grad = torch.tensor([1.0, -2.0, 0.5])
            optimizer.step()
    assert torch.allclose(weight[0], w, atol=1e-6)


def test_how_the_update_is_computed_is_not_reapplied_on_resume():
    """A restored optimizer's state is laid out for the implementation it ran (a fused one keeps
    its step counts on the parameters' device): ``fused`` and ``foreach`` stay as restored."""
    optimizer, _ = trained(adam(), None, epochs=1)
    before = {"optimizer": {"lr": 1e-3, "fused": None, "foreach": None}, "scheduler": {}}
    now = {"optimizer": {"lr": 1e-3, "fused": True, "foreach": True}, "scheduler": {}}
    assert apply_changed_settings(before, now, [optimizer]) == []
    assert optimizer.param_groups[0]["fused"] is None
