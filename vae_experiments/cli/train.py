"""``python train.py`` / ``vae-train``: the Hydra entry point of training."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from vae_experiments.cli import run_dirs
from vae_experiments.cli.did_you_mean import suggest_keys_on_failure
from vae_experiments.configs import CONFIG_DIR

if TYPE_CHECKING:
    from vae_experiments.training.interrupt import RunInterrupted

log = logging.getLogger(__name__)
run_dirs.register_resolvers()


def _resume(cfg: DictConfig, run_dir: Path) -> tuple[DictConfig, Path | None]:
    """The config and checkpoint to continue the run in ``run_dir`` with (``resume=``).

    Everything is checked before anything of the run is touched, so a refused resume changes
    nothing: the config (a run directory from someone else builds nothing we did not ship),
    that the run has something left to do, and that the checkpoint can be read.
    """
    from vae_experiments.config_checks import check_config
    from vae_experiments.runs import (
        FINISHED,
        load_config,
        newest_checkpoint,
        read_command_overrides,
        read_group_choices,
        read_metrics,
        read_status,
        run_dir_of,
    )
    from vae_experiments.runs.load import UnreadableCheckpointError, check_checkpoint
    from vae_experiments.targets import ConfigError

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError(
            allowed="resume= continues one run; resume each run of a sweep on its own"
        )
    if cfg.get("ckpt_path"):
        raise ConfigError(
            allowed="resume= and ckpt_path= cannot go together: resume continues a run in its own "
            "directory from its newest checkpoint, ckpt_path starts a new run from a checkpoint"
        )
    if run_dir.resolve() != run_dir_of(cfg.resume, key="resume").resolve():
        raise ConfigError(
            "hydra.run.dir",
            str(run_dir),
            f"resume={cfg.resume} continues the run in its own directory; leave "
            "hydra.run.dir out (or give that directory)",
        )
    saved = load_config(run_dir)
    resume = Path(str(cfg.resume)).expanduser()
    checkpoint = resume if resume.suffix == ".ckpt" else newest_checkpoint(run_dir)
    try:
        # What may change (how long and how it trains, not what or on what data): one rule.
        resumed, changed = run_dirs.resumed_config(
            saved,
            cfg,
            HydraConfig.get().overrides.task,
            read_group_choices(run_dir),
            checkpoint=checkpoint,
            started_with=read_command_overrides(run_dir),
        )
    except ValueError as error:
        raise ConfigError(allowed=str(error)) from None
    check_config(resumed)
    status = read_status(run_dir) or {}
    if status.get("status") == FINISHED:
        _refuse_if_nothing_to_train(run_dir, resumed, read_metrics(run_dir))
    if checkpoint is None:
        log.warning("%s has no checkpoint yet: training it again from the start", run_dir)
    else:
        try:
            _, epoch = check_checkpoint(checkpoint, key="resume")
        except UnreadableCheckpointError as error:
            raise ConfigError(allowed=str(error)) from None
        _refuse_max_epochs_below(run_dir, resumed, epoch)
        log.info("resuming %s from %s", run_dir, checkpoint)
    if changed:
        # train() writes the changed config.yaml once everything is built and the data read
        # (the earlier one is kept beside it), so a value that a constructor refuses, or bad
        # data, changes nothing either.
        log.info("changed on resume: %s", " ".join(changed))
    return resumed, checkpoint


def _check_start_checkpoint(cfg: DictConfig, path: Path) -> None:
    """Raises ConfigError, before anything of the new run is built or written, for a
    ``ckpt_path=`` that is no file, cannot be read, or holds another model than ``cfg``'s (its
    model class, network, latent size or image shape differ: its weights would not load)."""
    from vae_experiments.config_checks import choose_likelihood
    from vae_experiments.runs import read_command_overrides, run_dir_of
    from vae_experiments.runs.load import (
        CheckpointModelError,
        UnreadableCheckpointError,
        check_checkpoint,
        check_checkpoint_model,
    )
    from vae_experiments.targets import ConfigError

    if not path.is_file():
        raise ConfigError("ckpt_path", str(path), "no such checkpoint file")
    try:
        check_checkpoint(path, key="ckpt_path")
        choose_likelihood(cfg)  # the model as train() builds it (model/likelihood=auto)
        check_checkpoint_model(path, cfg, key="ckpt_path")
    except UnreadableCheckpointError as error:
        raise ConfigError(allowed=str(error)) from None
    except CheckpointModelError as error:
        try:
            started_with = read_command_overrides(run_dir_of(path))
        except FileNotFoundError:  # a checkpoint file on its own
            started_with = []
        if started_with:
            its_run = run_dirs.new_run_command(started_with, [], path)
            fix = f"give its run's model and data settings, as in: {its_run} (with your changes)"
        else:
            fix = "give the model settings it was trained with"
        raise ConfigError(
            allowed=f"{error}; nothing was started. To train on from it, {fix}; to train this "
            "model, leave ckpt_path out"
        ) from None


def _refuse_if_nothing_to_train(run_dir: Path, cfg: DictConfig, metrics: dict) -> None:
    """Raises ConfigError for a finished run whose limits (``trainer.max_epochs``,
    ``trainer.max_steps``) this resume did not raise past what it trained."""
    from vae_experiments.targets import ConfigError

    epochs, steps = int(metrics.get("epochs", 0)), int(metrics.get("steps", 0))
    max_epochs = cfg.trainer.get("max_epochs")
    max_steps = cfg.trainer.get("max_steps")
    if max_epochs is not None and max_epochs != -1 and max_epochs <= epochs:
        raise ConfigError(
            allowed=f"resume={run_dir}: the run finished at epoch {epochs} "
            f"(trainer.max_epochs={max_epochs}); raise trainer.max_epochs to train on, e.g. "
            f"python train.py resume={run_dir} trainer.max_epochs={2 * epochs}"
        )
    if max_steps is not None and max_steps != -1 and max_steps <= steps:
        raise ConfigError(
            allowed=f"resume={run_dir}: the run finished at step {steps} "
            f"(trainer.max_steps={max_steps}); raise trainer.max_steps to train on"
        )


def _refuse_max_epochs_below(run_dir: Path, cfg: DictConfig, epoch: int) -> None:
    """Raises ConfigError, before anything is written, for a ``trainer.max_epochs`` below the
    epoch the checkpoint reached (Lightning would fail after the run's status was rewritten)."""
    from vae_experiments.targets import ConfigError

    max_epochs = cfg.trainer.get("max_epochs")
    if max_epochs is not None and max_epochs != -1 and max_epochs < epoch:
        raise ConfigError(
            "trainer.max_epochs",
            max_epochs,
            f"the checkpoint of {run_dir} is at epoch {epoch}; give at least "
            f"trainer.max_epochs={epoch} (or leave it out)",
        )


def record_interruption(run_dir: Path, stop: RunInterrupted) -> None:
    """Writes ``status.json`` for a run stopped by a signal: where it stopped, the checkpoint
    to continue from, and the command that does it (for a stopped test, the same command runs
    the test again: training is not repeated)."""
    from vae_experiments.runs import INTERRUPTED, newest_checkpoint, write_status

    checkpoint = stop.checkpoint or newest_checkpoint(run_dir)
    command = f"python train.py resume={run_dir}"
    write_status(
        run_dir,
        INTERRUPTED,
        signal=stop.signal_name,
        step=stop.step,
        epoch=stop.epoch,
        phase=stop.phase,
        training="finished" if stop.phase == "testing" else "interrupted",
        resume_from=str(checkpoint) if checkpoint else None,
        resume_command=command,
    )
    from vae_experiments.cli.search import is_search_job

    if is_search_job():  # the search records the trial and says how to continue the search
        log.warning("%s", stop)
        return
    then = "Run the test again" if stop.phase == "testing" else "Continue it"
    log.warning("%s. %s with: %s", stop, then, command)


def parallel_jobs() -> int:
    """Jobs that this sweep's launcher runs at once on this machine, sharing its CPUs:
    ``hydra/launcher=joblib``'s ``n_jobs`` (-1: one per CPU, as joblib counts); 1 for a single
    run, the default launcher (one job after another), and cluster launchers (each job gets its
    own CPUs, which its affinity shows)."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return 1
    launcher = hydra_cfg.get("launcher") or {}
    if "joblib" not in str(launcher.get("_target_", "")):
        return 1
    n_jobs = launcher.get("n_jobs", -1)
    if not isinstance(n_jobs, int) or n_jobs == 0:
        return 1
    cpus = os.cpu_count() or 1
    return max(1, n_jobs if n_jobs > 0 else cpus + 1 + n_jobs)  # joblib: -1 all, -2 all but one


@suggest_keys_on_failure(CONFIG_DIR, "train")
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@run_dirs.owns_run_dir
def _main(cfg: DictConfig) -> float | None:
    """``python train.py model=vae data=digits ...``: trains one model; returns its
    ``optimized_metric`` from metrics.json (the value a search optimizes; None if it has none).

    ``<run dir>/status.json`` says how the run ended; in a sweep, a failed job is recorded there
    and the other jobs still run. ``resume=<run dir>`` continues an interrupted run there.
    The run directory is locked for the command's life; a config mistake is one ``error:`` line
    and leaves nothing behind (``run_dirs.owns_run_dir``).
    """
    # Heavy imports after Hydra has parsed the arguments, so --help and --cfg stay fast.
    from vae_experiments.cli.multirun_ddp import ddp_sweep_job
    from vae_experiments.runs import (
        FAILED,
        FINISHED,
        INTERRUPTED,
        LAST,
        RUNNING,
        DiskFullError,
        checkpoint_path,
        is_first_process,
        write_status,
    )
    from vae_experiments.training import train
    from vae_experiments.training.interrupt import RunInterrupted

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    record = is_first_process()
    # A bad resume= or ckpt_path= fails here, before the run's status.json is touched.
    ckpt_path = cfg.get("ckpt_path")
    if cfg.get("resume"):
        cfg, ckpt_path = _resume(cfg, run_dir)
    elif ckpt_path:
        _check_start_checkpoint(cfg, Path(ckpt_path).expanduser())
    if record:
        details = {"resumed_from": str(ckpt_path)} if ckpt_path else {}
        write_status(run_dir, RUNNING, pid=os.getpid(), **details)
    try:
        with ddp_sweep_job(cfg.trainer):
            metrics = train(cfg, run_dir, ckpt_path=ckpt_path, parallel_jobs=parallel_jobs())
    except RunInterrupted as stop:
        if record:
            record_interruption(run_dir, stop)
        raise SystemExit(stop.exit_code) from None
    except (KeyboardInterrupt, SystemExit):  # a second Ctrl-C; Lightning turns it into sys.exit
        if record:
            last = checkpoint_path(run_dir, LAST)
            write_status(run_dir, INTERRUPTED, resume_from=str(last) if last.is_file() else None)
        raise
    except DiskFullError as error:  # one line naming the file and the free space, no traceback
        if record:
            with contextlib.suppress(OSError):  # status.json may not fit on the full disk either
                write_status(run_dir, FAILED, error=f"{type(error).__name__}: {error}")
        raise SystemExit(f"error: {error}") from None
    except Exception as error:
        if record:
            write_status(
                run_dir,
                FAILED,
                error=f"{type(error).__name__}: {error}",
                traceback=traceback.format_exc(limit=-8),
            )
        raise
    if record:
        write_status(run_dir, FINISHED)
    return metrics.get(cfg.get("optimized_metric", "test/loss"))


def main() -> None:
    """``python train.py`` / ``vae-train``: locks a run directory given on the command line and
    refuses one that holds a run or the user's own files, then runs Hydra."""
    run_dirs.lock_command_line_dir(sys.argv[1:])
    run_dirs.refuse_existing_run_dir(sys.argv[1:])
    # resume=DIR composes against the run's own config groups (its keys exist there).
    sys.argv[1:] = run_dirs.with_saved_choices(sys.argv[1:], CONFIG_DIR)
    _main()
