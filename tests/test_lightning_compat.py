"""One test per private Lightning touchpoint (vae_experiments.training.lightning_compat), run
against the installed Lightning: an upgrade that changes one fails its test by name."""

from __future__ import annotations

import copy
import logging
import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, TensorDataset

from vae_experiments.training import lightning_compat
from vae_experiments.training.callbacks import RunCheckpoint


class Tiny(pl.LightningModule):
    """A linear regression on random data; records ``logs_this_step`` at every training step."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.logs_each_step: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.logs_each_step.append(lightning_compat.logs_this_step(self.trainer))
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(batches: int = 2) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4 * batches, 3, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def fit(
    tmp_path: Path,
    callbacks=(),
    batches: int = 2,
    ckpt_path=None,
    val_dataloader_batches: int = 1,
    **options,
) -> pl.Trainer:
    """A CPU trainer fitted on ``batches`` batches of random data for one epoch by default."""
    trainer = pl.Trainer(
        **{
            "max_epochs": 1,
            "accelerator": "cpu",
            "logger": False,
            "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "default_root_dir": tmp_path,
            **options,
        },
        callbacks=list(callbacks),
    )
    trainer.fit(Tiny(), loader(batches), loader(val_dataloader_batches), ckpt_path=ckpt_path)
    return trainer


class OnBatchEnd(pl.Callback):
    """Calls ``hook(trainer, pl_module, batch_idx)`` after every training batch."""

    def __init__(self, hook) -> None:
        self.hook = hook

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.hook(trainer, pl_module, batch_idx)


def test_logs_this_step_follows_log_every_n_steps(tmp_path):
    trainer = fit(tmp_path, batches=4, log_every_n_steps=2)
    # Asked inside training_step of batches 0..3: logged after the 2nd and the 4th.
    assert trainer.lightning_module.logs_each_step == [False, True, False, True]


def test_lightning_answers_sigusr1_only_under_slurm_with_auto_requeue(monkeypatch):
    for name in ("SLURM_NTASKS", "SLURM_JOB_NAME", "SLURM_JOB_ID", "SLURM_NODELIST"):
        monkeypatch.delenv(name, raising=False)
    options = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False}
    assert not lightning_compat.lightning_answers_sigusr1(pl.Trainer(**options))
    for auto_requeue in (True, False):
        plugins = [SLURMEnvironment(auto_requeue=auto_requeue)]
        trainer = pl.Trainer(**options, plugins=plugins)
        assert lightning_compat.lightning_answers_sigusr1(trainer) is auto_requeue


def test_request_stop_stops_after_the_step_with_sigterm_exception(tmp_path):
    def stop_after_first(trainer, pl_module, batch_idx):
        lightning_compat.request_stop(trainer, False)
        assert not trainer.received_sigterm
        lightning_compat.request_stop(trainer)
        assert trainer.received_sigterm

    with pytest.raises(SIGTERMException):
        fit(tmp_path, [OnBatchEnd(stop_after_first)], batches=4, default_root_dir=tmp_path)


def test_dump_checkpoint_holds_the_state_of_this_moment(tmp_path):
    dumped = {}

    def dump_at_second(trainer, pl_module, batch_idx):
        if batch_idx == 1:
            # Copied: the dump holds the live tensors, which later steps change.
            dumped.update(copy.deepcopy(lightning_compat.dump_checkpoint(trainer)))
            dumped["weights"] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    fit(tmp_path, [OnBatchEnd(dump_at_second)], batches=4)
    assert dumped["global_step"] == 2 and dumped["epoch"] == 0
    assert {"optimizer_states", "loops", "callbacks", "lr_schedulers"} <= dumped.keys()
    assert dumped["state_dict"].keys() == dumped["weights"].keys()
    for name, value in dumped["weights"].items():
        assert torch.equal(dumped["state_dict"][name], value)


class OnValidationBatchEnd(pl.Callback):
    """Calls ``hook(trainer, batch_idx)`` after every validation batch; records the batches."""

    def __init__(self, hook=None) -> None:
        self.hook = hook
        self.seen: list[tuple[int, int]] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        self.seen.append((trainer.current_epoch, batch_idx))
        if self.hook is not None:
            self.hook(trainer, batch_idx)


def test_restart_validation_from_start_redoes_the_whole_pass_then_trains_on(tmp_path):
    dumped = {}

    def dump_in_second_batch(trainer, batch_idx):
        if batch_idx == 1 and not dumped:
            checkpoint = copy.deepcopy(lightning_compat.dump_checkpoint(trainer))
            lightning_compat.restart_validation_from_start(checkpoint)
            torch.save(checkpoint, tmp_path / "mid.ckpt")
            dumped["step"] = trainer.global_step

    first = OnValidationBatchEnd(dump_in_second_batch)
    fit(tmp_path, [first], batches=2, max_epochs=2, val_dataloader_batches=3)
    assert dumped["step"] == 2

    resumed = OnValidationBatchEnd()
    trainer = fit(
        tmp_path,
        [resumed],
        batches=2,
        max_epochs=2,
        ckpt_path=tmp_path / "mid.ckpt",
        val_dataloader_batches=3,
    )
    # Epoch 0's pass again from its first batch, then epoch 1 trained and validated.
    assert resumed.seen == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert trainer.global_step == 4


def test_count_optimizer_step_counts_a_step_lightning_did_not_take(tmp_path):
    counted = []

    def count_one_more(trainer, pl_module, batch_idx):
        before = (trainer.global_step, trainer.fit_loop.epoch_loop._batches_that_stepped)
        lightning_compat.count_optimizer_step(trainer)
        counted.append((before, trainer.global_step))

    trainer = fit(tmp_path, [OnBatchEnd(count_one_more)], batches=2, max_epochs=2)
    # Each batch: Lightning's step and the one counted; the logging step count follows.
    assert [after for _, after in counted] == [2, 4, 6, 8]
    assert [before for before, _ in counted] == [(1, 0), (3, 2), (5, 4), (7, 6)]
    assert trainer.global_step == 8
    assert trainer.fit_loop.epoch_loop._batches_that_stepped == 8
    assert lightning_compat.dump_checkpoint(trainer)["global_step"] == 8  # what checkpoints save


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_fixed_state_key_is_the_key_lightning_saves_and_restores(tmp_path):
    options = {"monitor": "val_loss", "mode": "min", "filename": "best"}
    first = RunCheckpoint(dirpath=tmp_path / "a", **options)
    key = first.state_key
    uncached = RunCheckpoint(dirpath=tmp_path / "a", **options)
    assert key == ModelCheckpoint.state_key.fget(uncached)  # Lightning's own, as computed now
    fit(tmp_path, [first])
    # Lightning's key after fit is still the one fixed before it: caching it is safe.
    assert ModelCheckpoint.state_key.fget(first) == key
    saved = torch.load(tmp_path / "a" / "best.ckpt", weights_only=False)
    assert key in saved["callbacks"]
    # A resumed run's callback finds its state under the same key.
    second = RunCheckpoint(dirpath=tmp_path / "a", **options)
    fit(tmp_path, [second], ckpt_path=tmp_path / "a" / "best.ckpt", max_epochs=2)
    assert second.state_key == key
    assert second.best_model_score is not None


def test_ddp_children_run_in_the_job_directory_of_a_sweep(tmp_path, monkeypatch):
    """``cli/multirun_ddp.py`` relies on Lightning's DDP launcher appending
    ``hydra.run.dir=<HydraConfig's run.dir>`` to the command line it starts the ranks with
    (``lightning_fabric``'s private ``_hydra_subprocess_cmd``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from lightning_fabric.strategies.launchers.subprocess_script import _hydra_subprocess_cmd
    from omegaconf import OmegaConf, open_dict

    from tests.conftest import CONFIG_DIR
    from vae_experiments.cli.multirun_ddp import ddp_sweep_job

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra.mode=MULTIRUN"], return_hydra_config=True)
    job_dir = tmp_path / "sweep" / "3"
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(job_dir)
        cfg.hydra.runtime.cwd = str(tmp_path)
        cfg.hydra.overrides.task = ["model.latent_dim=4"]
        cfg.hydra.overrides.hydra = []
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "model.latent_dim=2,4"])
    HydraConfig.instance().set_config(cfg)
    try:
        with ddp_sweep_job(OmegaConf.create({"strategy": "auto"})):
            command, cwd = _hydra_subprocess_cmd(local_rank=1)
    finally:
        HydraConfig.instance().cfg = None
    assert f'hydra.run.dir="{job_dir}"' in command
    assert "-m" not in command[command.index("model.latent_dim=4") :]
    assert "model.latent_dim=2,4" not in command
    assert cwd == str(tmp_path)


def lightning_noise(tmp_path: Path) -> None:
    """A run that makes Lightning say everything :func:`quiet_lightning_noise` hides: a
    mid-epoch resume (DataLoader not resumable) from another run's checkpoint (dirpath changed)
    into a checkpoint folder that is not empty, an epoch shorter than the logging interval;
    Lightning's own pytree code runs in every fit."""

    def save_mid_epoch(trainer, pl_module, batch_idx):
        if batch_idx == 0:
            trainer.save_checkpoint(tmp_path / "mid.ckpt")

    options = {"monitor": "val_loss", "mode": "min"}
    fit(tmp_path, [ModelCheckpoint(tmp_path / "a", **options), OnBatchEnd(save_mid_epoch)])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "other.ckpt").write_bytes(b"")
    fit(tmp_path, [ModelCheckpoint(tmp_path / "b", **options)], ckpt_path=tmp_path / "mid.ckpt")
    # Fewer batches than log_every_n_steps, with a logger.
    fit(tmp_path, logger=CSVLogger(tmp_path / "csv"), log_every_n_steps=50)


def test_quiet_lightning_noise_hides_only_lightnings_noise_and_only_inside(tmp_path, caplog):
    def run(name: str, quiet: bool) -> tuple[list[str], str]:
        caplog.clear()
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
            warnings.simplefilter("always")
            if quiet:
                with lightning_compat.quiet_lightning_noise():
                    lightning_noise(tmp_path / name)
                    warnings.warn("ours", UserWarning, stacklevel=1)
            else:
                lightning_noise(tmp_path / name)
        return [str(w.message) for w in caught], caplog.text

    filters = list(warnings.filters)
    loud, loud_log = run("loud", quiet=False)
    quiet, quiet_log = run("quiet", quiet=True)
    assert warnings.filters == filters
    noise = [
        "You're resuming from a checkpoint that ended before",
        "Checkpoint directory",
        "The dirpath has changed from",
        "is smaller than the logging interval",
    ]
    for text in noise:
        assert any(text in message for message in loud), f"Lightning no longer warns {text!r}"
        assert not any(text in message for message in quiet)
    assert "litlogger" in loud_log and "litlogger" not in quiet_log
    assert "ours" in quiet  # other warnings still show
    leaf_spec = "isinstance(treespec, LeafSpec)"
    assert not any(leaf_spec in message for message in quiet)
    if not any(leaf_spec in message for message in loud):
        pytest.skip("torch no longer warns about LeafSpec here: its filter can go")


def test_hook_name_attributes_are_what_lightning_sets_on_the_module_around_hooks(
    tmp_path, monkeypatch
):
    set_on_module: dict[str, set] = {}  # attribute -> the values Lightning set during fit
    original = torch.nn.Module.__setattr__

    def record(module, name, value):
        if isinstance(module, Tiny):
            set_on_module.setdefault(name, set()).add(value if isinstance(value, str) else None)
        original(module, name, value)

    monkeypatch.setattr(torch.nn.Module, "__setattr__", record)
    fit(tmp_path, batches=2)
    for name in lightning_compat.HOOK_NAME_ATTRIBUTES:
        # Set while fitting, to hook names (and None): never a parameter, buffer or module.
        assert "training_step" in set_on_module[name]
        assert "on_train_batch_end" in set_on_module[name]


def test_lightning_still_sets_the_nvml_check_that_training_pauses(tmp_path, monkeypatch):
    """``import lightning_fabric`` sets PYTORCH_NVML_BASED_CUDA_CHECK=1, which makes every
    optimizer step ask NVML whether a GPU exists; our training processes unset it while they
    fit and put it back after. If Lightning stops setting it, the pause can go."""
    import os
    import subprocess

    from tests.conftest import train_run
    from vae_experiments.training.module import LitModel

    variable = lightning_compat.NVML_CHECK_VARIABLE
    env = {key: value for key, value in os.environ.items() if key != variable}
    code = f"import os, lightning_fabric; print(os.environ.get({variable!r}))"
    shown = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert shown.stdout.strip() == "1", shown.stderr

    monkeypatch.setenv(variable, "1")
    seen_in_steps = set()
    original = LitModel._step

    def step(self, x, y, stage, *args, **kwargs):
        if stage != "test":  # the test runs after the fit, as Lightning set it
            seen_in_steps.add(os.environ.get(variable))
        return original(self, x, y, stage, *args, **kwargs)

    monkeypatch.setattr(LitModel, "_step", step)
    train_run(tmp_path / "run", ["model=ae", "logger=none", "trainer.max_epochs=1"])
    assert seen_in_steps == {None}  # paused in every training and validation step
    assert os.environ.get(variable) == "1"  # and back after the fit

    lightning_compat.pause_nvml_cuda_check()
    with pytest.raises(RuntimeError):  # a fit that raises still puts it back (train.py)
        try:
            raise RuntimeError("a fit that failed")
        finally:
            lightning_compat.restore_nvml_cuda_check()
    assert os.environ.get(variable) == "1"
