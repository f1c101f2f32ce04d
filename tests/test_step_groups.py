"""Groups of training batches (``steps_per_group``): the plan of groups, the sampler and data
module that deliver them, when a run is not grouped, and that grouped training is the same
training: the same weights bit for bit, the same steps, logging points, stops and resumes."""

from __future__ import annotations

import functools
import math
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import FAST, compose_config, train_run
from vae_experiments.data import BatchGroup, ShuffledBatchSampler, TensorImages
from vae_experiments.data.batches import group_sizes
from vae_experiments.models.vae import VAE
from vae_experiments.runs import tensorboard_dir
from vae_experiments.training import train
from vae_experiments.training.interrupt import RunInterrupted
from vae_experiments.training.step_groups import (
    largest_divisor_at_most,
    steps_per_group,
    ungrouped_because,
)

# --- the plan ---------------------------------------------------------------------------------


def test_groups_end_at_multiples_of_the_group_size_and_at_the_epochs_end():
    assert group_sizes(0, 10, 20) == [10]
    assert group_sizes(0, 40, 20) == [20, 20]
    assert group_sizes(0, 26, 20) == [20, 6]
    assert group_sizes(20, 26, 20) == [6]  # resumed at a group's start


def test_a_group_cut_short_gives_its_rest_to_the_next_so_every_epoch_has_as_many_groups():
    assert group_sizes(3, 60, 20) == [37, 20]  # 17 left of group 0 join group 1
    for num_batches, size in [(60, 20), (26, 20), (7, 3), (41, 4)]:
        groups = math.ceil(num_batches / size)
        last_group_start = (groups - 1) * size
        for first in range(last_group_start + 1):  # a run is never stopped inside the last
            sizes = group_sizes(first, num_batches, size)
            assert sum(sizes) == num_batches - first
            # Lightning counted the group cut short as done: the epoch keeps its count.
            assert math.ceil(first / size) + len(sizes) == groups, first


def test_grouped_sampler_yields_the_same_batches_in_groups():
    plain = ShuffledBatchSampler(100, 4, shuffle=True, drop_last=True, seed=3)
    grouped = ShuffledBatchSampler(100, 4, shuffle=True, drop_last=True, seed=3, steps_per_item=3)
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        grouped.set_epoch(epoch)
        items = list(grouped)
        assert [tuple(item.shape) for item in items] == [(3, 4)] * 8 + [(1, 4)]
        assert len(grouped) == len(items) == 9 and grouped.batches_per_epoch() == 25
        assert torch.equal(torch.cat([i.reshape(-1) for i in items]), torch.cat(list(plain)))
    grouped.resume_at(epoch=1, batches_done=4)  # stopped inside group 1 (batches 3-5)
    rest = list(grouped)
    assert [len(item) for item in rest] == [5] + [3] * 5 + [1]  # 2 + 7 = 9 groups in all
    assert torch.equal(torch.cat([i.reshape(-1) for i in rest]), torch.cat(list(plain))[16:])


def test_limit_train_batches_counts_batches():
    sampler = ShuffledBatchSampler(100, 4, True, True, seed=0, steps_per_item=3, max_batches=7)
    assert sampler.batches_per_epoch() == 7 and [len(i) for i in sampler] == [3, 3, 1]
    sampler.max_batches = 0.5
    assert sampler.batches_per_epoch() == 12 and len(sampler) == 4
    sampler.max_batches = 0.01
    with pytest.raises(ValueError, match=r"trainer.limit_train_batches=0.01 of 25 .* is 0"):
        len(sampler)


def test_a_group_makes_each_batch_when_it_is_taken():
    taken = []

    def make_batch(batch):
        taken.append(float(batch[0, 0, 0, 0]))
        return batch * 2

    group = BatchGroup(torch.arange(3.0).view(3, 1, 1, 1, 1), make_batch)
    assert len(group) == 3 and taken == []
    assert float(group[1][0, 0, 0, 0]) == 2.0 and taken == [1.0]
    with pytest.raises(ValueError, match=r"\(S, B, C, H, W\)"):
        BatchGroup(torch.zeros(2, 1, 1, 1))


# --- when a run is grouped ---------------------------------------------------------------------


def stub_trainer(**changes) -> SimpleNamespace:
    settings = dict(
        world_size=1,
        accumulate_grad_batches=1,
        precision="32-true",
        val_check_interval=1.0,
        check_val_every_n_epoch=1,
        overfit_batches=0.0,
        fast_dev_run=False,
        log_every_n_steps=20,
    )
    settings.update(changes)
    return SimpleNamespace(**settings)


IN_MEMORY = TensorImages(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(4))
ADAM = functools.partial(torch.optim.Adam, lr=1e-3)


@pytest.mark.parametrize(
    ("changes", "split", "optimizer", "scheduler", "reason"),
    [
        ({}, torch.utils.data.TensorDataset(torch.zeros(2)), ADAM, None, "read from files"),
        ({"world_size": 2}, IN_MEMORY, ADAM, None, "DDP"),
        ({"accumulate_grad_batches": 4}, IN_MEMORY, ADAM, None, "accumulate_grad_batches=4"),
        ({"precision": "16-mixed"}, IN_MEMORY, ADAM, None, "precision=16-mixed"),
        ({"val_check_interval": 0.5}, IN_MEMORY, ADAM, None, "val_check_interval"),
        ({}, IN_MEMORY, ADAM, {"interval": "step"}, "steps every step"),
        ({}, IN_MEMORY, functools.partial(torch.optim.LBFGS), None, "closure"),
    ],
    ids=["files", "ddp", "accumulation", "grad-scaler", "val-in-epoch", "step-lr", "lbfgs"],
)
def test_runs_whose_steps_lightning_must_take_are_not_grouped(
    changes, split, optimizer, scheduler, reason
):
    trainer = stub_trainer(**changes)
    assert reason in ungrouped_because(trainer, split, optimizer, scheduler)
    assert steps_per_group(20, trainer, split, optimizer, scheduler) == 1


def test_group_size_divides_the_logging_interval():
    assert ungrouped_because(stub_trainer(), IN_MEMORY, ADAM, {"interval": "epoch"}) is None
    assert steps_per_group(20, stub_trainer(), IN_MEMORY, ADAM, None) == 20
    assert steps_per_group(15, stub_trainer(), IN_MEMORY, ADAM, None) == 10
    assert steps_per_group(20, stub_trainer(log_every_n_steps=7), IN_MEMORY, ADAM, None) == 7
    assert steps_per_group(1, stub_trainer(), IN_MEMORY, ADAM, None) == 1
    assert largest_divisor_at_most(50, 20) == 10 and largest_divisor_at_most(13, 20) == 13


# --- grouped training is the same training -----------------------------------------------------

# A VAE on dynamically binarised digits with clipping and an epoch schedule: the binarisation and
# the reparameterised noise interleave, and every step's order matters.
EXACT = [
    "model=vae",
    "model/network=mlp",
    "model.network.hidden_dims=[32]",
    "data.binarize=dynamic",
    "trainer.gradient_clip_val=0.5",
    "scheduler=cosine",
]


def last_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    a, b = last_checkpoint(run_a), last_checkpoint(run_b)
    assert a["global_step"] == b["global_step"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    moments_a, moments_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for index, state in moments_a.items():
        assert torch.equal(state["exp_avg_sq"], moments_b[index]["exp_avg_sq"])
    assert a["lr_schedulers"] == b["lr_schedulers"]


def train_loss_steps(run_dir: Path) -> list[int]:
    events = EventAccumulator(str(tensorboard_dir(run_dir)))
    events.Reload()
    (tag,) = [tag for tag in events.Tags()["scalars"] if tag.startswith("train/loss [")]
    return [event.step for event in events.Scalars(tag)]  # in the unit of the run's likelihood


@pytest.fixture(scope="module")
def one_step_at_a_time(tmp_path_factory) -> Path:
    """Digits in batches of 48: 26 steps per epoch, 2 epochs, every step through Lightning."""
    run_dir = tmp_path_factory.mktemp("ungrouped") / "run"
    return train_run(run_dir, [*EXACT, "data.batch_size=48", "steps_per_group=1"])


def test_grouped_training_gives_the_same_weights_as_one_step_at_a_time(
    tmp_path, one_step_at_a_time
):
    # Groups of 20 and 6 steps: a full group and a short one at each epoch's end.
    grouped = train_run(tmp_path / "run", [*EXACT, "data.batch_size=48"])
    assert last_checkpoint(grouped)["global_step"] == 52
    assert last_checkpoint(grouped)["ImageDataModule"]["steps_per_item"] == 20
    assert_same_weights(one_step_at_a_time, grouped)
    # A logging step inside a group is written at the group's end: step 39 at 45; every epoch
    # has its own point at its end.
    assert train_loss_steps(one_step_at_a_time) == [19, 25, 39, 51]
    assert train_loss_steps(grouped) == [19, 25, 45, 51]


def test_bf16_mixed_groups_give_the_same_weights(tmp_path):
    # The group's own steps run inside Lightning's autocast context, their backward outside it.
    bf16 = [*EXACT, "trainer.precision=bf16-mixed", "trainer.max_epochs=1"]
    one = train_run(tmp_path / "one", [*bf16, "steps_per_group=1"])
    grouped = train_run(tmp_path / "grouped", bf16)
    assert last_checkpoint(grouped)["ImageDataModule"]["steps_per_item"] == 20
    assert_same_weights(one, grouped)


def test_groups_ending_at_logging_steps_log_at_the_same_steps(tmp_path):
    ungrouped = train_run(tmp_path / "one", ["steps_per_group=1", "trainer.max_epochs=1"])
    grouped = train_run(tmp_path / "grouped", ["trainer.max_epochs=1"])
    assert train_loss_steps(grouped) == train_loss_steps(ungrouped) == [19, 39]


def test_max_steps_and_limit_train_batches_count_steps(tmp_path, one_step_at_a_time):
    limits = ["data.batch_size=48", "trainer.max_epochs=-1", "+trainer.limit_train_batches=7"]
    one = train_run(tmp_path / "one", [*EXACT, *limits, "+trainer.max_steps=17"])
    run = train_run(tmp_path / "grouped", [*EXACT, *limits, "+trainer.max_steps=17"])
    assert last_checkpoint(run)["global_step"] == 17  # 7 + 7 + 3 of the third epoch
    assert last_checkpoint(run)["epoch"] == 2
    assert_same_weights(one, run)


def stop_during_step(monkeypatch, signal_step: int) -> None:
    """SIGTERM arrives while the model computes the loss of step ``signal_step`` (0-based)."""
    original = VAE.loss

    def loss(self, x, y=None, step=None, monitor=True):
        if step == signal_step and self.training:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, x, y, step, monitor)

    monkeypatch.setattr(VAE, "loss", loss)


@pytest.mark.parametrize(
    ("signal_step", "stopped_at"),
    [
        pytest.param(4, 6, id="first-group"),
        pytest.param(18, 20, id="groups-last-own-step", marks=pytest.mark.slow),
        pytest.param(30, 32, id="second-epoch", marks=pytest.mark.slow),
        pytest.param(21, 26, id="epochs-last-group"),
    ],
)
def test_a_signal_inside_a_group_stops_after_its_step_and_resumes_exactly(
    tmp_path, one_step_at_a_time, monkeypatch, signal_step, stopped_at
):
    """The run stops one step after the step the signal arrived in (Lightning takes the step it
    was handed; in an epoch's last group, whose end Lightning must see, at the group's end), and
    the resumed run, which trains the rest of the group first, ends with the weights of a run
    that never stopped."""
    stop_during_step(monkeypatch, signal_step)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = [*FAST, *EXACT, "data.batch_size=48"]
    with pytest.raises(RunInterrupted) as stopped:
        train(compose_config(cfg), run_dir)
    assert stopped.value.step == stopped_at
    assert last_checkpoint(run_dir)["global_step"] == stopped_at
    monkeypatch.undo()
    train(compose_config(cfg), run_dir, ckpt_path=run_dir / "checkpoints" / "last.ckpt")
    assert_same_weights(one_step_at_a_time, run_dir)


def test_a_run_stopped_one_step_at_a_time_resumes_in_groups_exactly(
    tmp_path, one_step_at_a_time, monkeypatch
):
    """Checkpoints made before groups existed (or with steps_per_group=1) resume exactly: the
    resumed session goes on one step at a time, as Lightning counted the interrupted epoch (a
    session resumed at an epoch's end, or the next one, trains in groups)."""
    stop_during_step(monkeypatch, 8)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(RunInterrupted):
        train(compose_config([*FAST, *EXACT, "data.batch_size=48", "steps_per_group=1"]), run_dir)
    assert last_checkpoint(run_dir)["global_step"] == 9  # one step at a time: after step 8
    monkeypatch.undo()
    cfg = compose_config([*FAST, *EXACT, "data.batch_size=48"])
    train(cfg, run_dir, ckpt_path=run_dir / "checkpoints" / "last.ckpt")
    assert_same_weights(one_step_at_a_time, run_dir)
    assert last_checkpoint(run_dir)["ImageDataModule"]["steps_per_item"] == 1


def test_an_epoch_stopped_in_groups_ends_in_groups_or_is_refused_by_name(tmp_path, monkeypatch):
    stop_during_step(monkeypatch, 4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = [*FAST, *EXACT, "data.batch_size=48"]
    with pytest.raises(RunInterrupted):
        train(compose_config(cfg), run_dir)
    monkeypatch.undo()
    last = run_dir / "checkpoints" / "last.ckpt"
    # A run that cannot take groups (here: gradient accumulation) says so before training.
    refused = compose_config([*cfg, "+trainer.accumulate_grad_batches=2"])
    with pytest.raises(
        ValueError,
        match=r"inside epoch 0 \(after 6 batches\).* groups of 20 .*"
        r"accumulate_grad_batches=2",
    ):
        train(refused, tmp_path / "other", ckpt_path=last)
    # steps_per_group=1 takes effect after the interrupted epoch: it ends in its groups.
    train(compose_config([*cfg, "steps_per_group=1"]), run_dir, ckpt_path=last)
    assert last_checkpoint(run_dir)["global_step"] == 52
    assert train_loss_steps(run_dir)[-1] == 51
