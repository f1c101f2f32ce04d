"""Every use of Lightning's private API, one function each, and the filters for its console noise.

Lightning 2.6 offers no public way to do what these functions do; each docstring names the private
attribute it uses and why the public API does not serve. ``tests/test_lightning_compat.py`` has
one test per function, run against the installed Lightning, so an upgrade that renames or changes
one of these attributes fails that test by name instead of breaking a run in the middle.

The rest of the package uses only Lightning's public API (``pytorch_lightning`` without
underscored modules or attributes); new private touchpoints belong here.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.environments import SLURMEnvironment


def logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether the trainer writes step metrics after the current step (every
    ``log_every_n_steps``).

    Private: ``trainer._logger_connector.should_update_logs``, which Lightning's own callbacks
    (``LearningRateMonitor``, ``DeviceStatsMonitor``) use too; the count it is based on (batches
    that stepped the optimizer) is not public. A trainer without the connector (a stand-in in a
    unit test) logs every step.
    """
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def lightning_answers_sigusr1(trainer: pl.Trainer) -> bool:
    """Whether Lightning handles SIGUSR1 itself: under SLURM with ``auto_requeue`` it saves
    ``hpc_ckpt_<n>.ckpt`` and requeues the job.

    Private: ``trainer._accelerator_connector.cluster_environment``, where Lightning's signal
    connector looks. The public ``trainer.strategy.cluster_environment`` exists only for
    multi-process strategies, and a single-device SLURM job is requeued too.
    """
    environment = trainer._accelerator_connector.cluster_environment
    return isinstance(environment, SLURMEnvironment) and environment.auto_requeue


def request_stop(trainer: pl.Trainer, stop: bool = True) -> None:
    """Asks the trainer to stop after the current training step (``stop=False`` withdraws it).

    Private: sets ``trainer._signal_connector.received_sigterm``, the flag behind the public,
    read-only ``trainer.received_sigterm``. Lightning checks it after every training step, shares
    rank 0's value with the other DDP processes and raises ``SIGTERMException`` on each of them.
    The public ``trainer.should_stop`` waits for the end of the epoch (and ``min_epochs``), is not
    shared between processes, and raises nothing, so the run could not tell it was stopped.
    """
    trainer._signal_connector.received_sigterm = stop


def dump_checkpoint(trainer: pl.Trainer) -> dict[str, Any]:
    """The full checkpoint (weights, optimizer, loops, callbacks' states) of this moment, not
    written anywhere; ``trainer.strategy.save_checkpoint(checkpoint, path)`` writes it.

    Private: ``trainer._checkpoint_connector.dump_checkpoint(weights_only=False)``. The public
    ``trainer.save_checkpoint`` ends with a barrier that would wait forever for DDP processes
    that stopped at another point.
    """
    return trainer._checkpoint_connector.dump_checkpoint(weights_only=False)


#: Attributes that Lightning's trainer sets on the LightningModule around every hook it calls
#: (``pl_module._current_fx_name = hook_name`` before, the previous name after), a few dozen
#: times per training step. They hold a hook's name or None, never a parameter, buffer or
#: submodule, so :class:`~vae_experiments.training.module.LitModel` stores them directly instead
#: of through ``torch.nn.Module.__setattr__``, which checks every value against all three.
#: Private: the attribute name is Lightning's (``trainer/call.py``); if a Lightning version
#: renames it, nothing breaks, the shortcut only stops applying (and its test fails by name).
HOOK_NAME_ATTRIBUTES = frozenset({"_current_fx_name"})


#: Where a fit checkpoint keeps the validation loop's batch counters.
VAL_PROGRESS_KEY = "epoch_loop.val_loop.batch_progress"


def restart_validation_from_start(checkpoint: dict[str, Any]) -> None:
    """Edits a checkpoint dumped in the middle of a validation pass so that a run resumed from
    it validates again from the first batch (and then trains on), as if it had stopped just
    before the pass.

    Private: the fit loop's saved progress counters (``checkpoint["loops"]["fit_loop"]
    ["epoch_loop.val_loop.batch_progress"]``, Lightning's ``_BatchProgress`` state dict). Left
    as dumped, Lightning 2.6 resumes a pass it sees stopped mid-way ("restarted mid
    evaluation") counting the batches already done, and the metrics of the pass (``val/loss``,
    which picks best.ckpt) would cover only the rest. Here the pass's counters are put back to
    zero batches done, with one batch started, which is how Lightning recognises a pass to
    redo.
    """
    progress = checkpoint["loops"]["fit_loop"][VAL_PROGRESS_KEY]
    total, current = progress["total"], progress["current"]
    done_before = total["completed"] - current["completed"]
    progress["total"] = {
        "ready": done_before + 1,
        "started": done_before + 1,
        "processed": done_before,
        "completed": done_before,
    }
    progress["current"] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
    progress["is_last_batch"] = False


def count_optimizer_step(trainer: pl.Trainer) -> None:
    """Counts an optimizer step that the LightningModule took itself inside ``training_step``
    (a group of batches, see ``LitModel``) as automatic optimization counts its own:
    ``trainer.global_step`` and the step that logged metrics are filed under go up by one, so
    that both count optimizer steps as in a run without groups, and checkpoints save them.

    Private: the training epoch loop's ``automatic_optimization.optim_progress.optimizer``
    (``step`` and ``zero_grad`` progress; ``global_step`` reads ``step.total.completed``) and
    ``_batches_that_stepped`` (the step of logged metrics, and what ``log_every_n_steps``
    counts). Lightning has no public way to count a step it did not take.
    """
    loop = trainer.fit_loop.epoch_loop
    progress = loop.automatic_optimization.optim_progress.optimizer
    progress.zero_grad.increment_ready()
    progress.zero_grad.increment_started()
    progress.zero_grad.increment_completed()
    progress.step.increment_ready()
    progress.step.increment_completed()
    loop._batches_that_stepped += 1


def fixed_state_key(callback: ModelCheckpoint) -> str:
    """``callback.state_key``, computed once per callback and then reused.

    Lightning formats the state key of every callback for every hook of every step (its profiler's
    action names), and ``ModelCheckpoint``'s is the repr of a dict. Reusing it relies on a
    Lightning internal: ``ModelCheckpoint`` builds the key only from constructor arguments
    (``monitor``, ``mode``, ``every_n_*``, ``train_time_interval``), which do not change later; a
    changed key would make a resumed run miss the callback's saved state.
    """
    cache = callback.__dict__
    if "_fixed_state_key" not in cache:
        cache["_fixed_state_key"] = ModelCheckpoint.state_key.fget(callback)
    return cache["_fixed_state_key"]


# (message regex, category, module regex) of warnings that say nothing to our users.
QUIET_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # Resuming: our data module restores the position in the epoch itself (Lightning looks for it
    # on the DataLoader), and the checkpoint folder of the run being resumed is meant to be full.
    (r"You're resuming from a checkpoint that ended before", UserWarning, ""),
    (r"Checkpoint directory .* exists and is not empty", UserWarning, ""),
    # A run with fewer batches per epoch than log_every_n_steps: LitModel logs the train terms
    # at every epoch's end too, so the curve Lightning warns about is there.
    (r"The number of training batches .* is smaller than the logging interval", UserWarning, ""),
    # ckpt_path= from another run: its checkpoint callbacks' state stays with that run, as it
    # should.
    (r"The dirpath has changed from", UserWarning, ""),
    # Lightning 2.6 builds torch's deprecated LeafSpec (pytorch_lightning.utilities._pytree) on
    # every run with torch >= 2.10; nothing for us to change.
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        r"pytorch_lightning\.utilities\._pytree",
    ),
)
#: Lightning's INFO records that go to this logger and contain this text are dropped: it
#: advertises a cloud logger on every run, and our users' logs are about their runs.
QUIET_LOGGER = "pytorch_lightning.utilities.rank_zero"
QUIET_LOG_TEXT = "litlogger"


def _drop_advert(record: logging.LogRecord) -> bool:
    return QUIET_LOG_TEXT not in record.getMessage()


@contextmanager
def quiet_lightning_noise() -> Iterator[None]:
    """Inside it, Lightning's warnings and log lines in :data:`QUIET_WARNINGS` and
    :data:`QUIET_LOGGER` are not shown; outside, warnings and logging are as they were.

    Also usable as a decorator (``@quiet_lightning_noise()``). Only the listed messages are
    filtered, each by message, category and (where it is stable) the module that warns.
    """
    logger = logging.getLogger(QUIET_LOGGER)
    with warnings.catch_warnings():
        for message, category, module in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        logger.addFilter(_drop_advert)
        try:
            yield
        finally:
            logger.removeFilter(_drop_advert)


#: Set to "1" by ``import lightning_fabric`` (its ``__init__``), so that Lightning's "is there a
#: GPU?" does not initialise CUDA in a process that ``ddp_fork`` then forks. With it set,
#: ``torch.cuda.is_available()`` asks NVML on every call until CUDA is initialised, and
#: ``torch.optim`` asks once per optimizer step (its graph-capture check): about 0.1 ms a step on
#: a machine without an NVIDIA driver (120 us against 4 us measured here), 3-5% of a small
#: model's step, which a plain PyTorch loop does not pay.
NVML_CHECK_VARIABLE = "PYTORCH_NVML_BASED_CUDA_CHECK"
_NOT_SET = object()
_paused_nvml_check: Any = _NOT_SET  # the variable's value while paused


def pause_nvml_cuda_check() -> None:
    """Unsets :data:`NVML_CHECK_VARIABLE` for the rest of the fit, remembering its value: call it
    where the training processes already exist (``on_fit_start``: after ``ddp_fork`` forked,
    in each child), so no later fork needs it, and :func:`restore_nvml_cuda_check` after."""
    global _paused_nvml_check
    if _paused_nvml_check is _NOT_SET:
        _paused_nvml_check = os.environ.pop(NVML_CHECK_VARIABLE, None)


def restore_nvml_cuda_check() -> None:
    """Puts back what :func:`pause_nvml_cuda_check` unset (a no-op if nothing is paused), so that
    a next run in the same process (a sweep's next job) starts as Lightning expects."""
    global _paused_nvml_check
    if _paused_nvml_check is _NOT_SET:
        return
    if _paused_nvml_check is not None:
        os.environ[NVML_CHECK_VARIABLE] = _paused_nvml_check
    _paused_nvml_check = _NOT_SET
