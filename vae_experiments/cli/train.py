"""``python train.py`` / ``vae-train``: the Hydra entry point of training."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from vae_experiments.cli import run_dirs
from vae_experiments.cli.did_you_mean import suggest_keys_on_failure
from vae_experiments.configs import CONFIG_DIR

log = logging.getLogger(__name__)
run_dirs.register_resolvers()


def _resume(cfg: DictConfig, run_dir: Path, record: bool) -> tuple[DictConfig, Path | None]:
    """The config and checkpoint to continue the run in ``run_dir`` with (``resume=``)."""
    from vae_experiments.runs import load_config, newest_checkpoint, save_config
    from vae_experiments.targets import ConfigError
    from vae_experiments.training.config_checks import check_config

    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError("resume= continues one run; resume each run of a sweep on its own")
    if cfg.get("ckpt_path"):
        raise ConfigError(
            "resume= and ckpt_path= cannot go together: resume continues a run in its own "
            "directory from its newest checkpoint, ckpt_path starts a new run from a checkpoint"
        )
    saved = load_config(run_dir)
    try:
        resumed, changed = run_dirs.resumed_config(saved, cfg, HydraConfig.get().overrides.task)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    # Everything is checked before anything of the run is touched: a failed resume changes
    # nothing (and a run directory from someone else builds nothing that we did not ship).
    check_config(resumed)
    resume = Path(str(cfg.resume)).expanduser()
    checkpoint = resume if resume.suffix == ".ckpt" else newest_checkpoint(run_dir)
    if checkpoint is None:
        log.warning("%s has no checkpoint yet: training it again from the start", run_dir)
    else:
        log.info("resuming %s from %s", run_dir, checkpoint)
    if changed and record:
        # The run's config says what it was trained with; the earlier one is kept beside it.
        save_config(run_dir, resumed, keep_previous=True)
        log.info("changed on resume: %s", " ".join(changed))
    return resumed, checkpoint


@suggest_keys_on_failure(CONFIG_DIR, "train")
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@run_dirs.owns_run_dir
def _main(cfg: DictConfig) -> float:
    """``python train.py model=vae data=digits ...``: trains one model; returns its test loss
    (the value Hydra's sweepers minimise).

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
        checkpoint_path,
        is_first_process,
        newest_checkpoint,
        write_status,
    )
    from vae_experiments.training import train
    from vae_experiments.training.interrupt import RunInterrupted

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    record = is_first_process()
    # A bad resume= or ckpt_path= fails here, before the run's status.json is touched.
    ckpt_path = cfg.get("ckpt_path")
    if cfg.get("resume"):
        cfg, ckpt_path = _resume(cfg, run_dir, record)
    elif ckpt_path and not Path(ckpt_path).expanduser().is_file():
        from vae_experiments.targets import ConfigError

        raise ConfigError("ckpt_path", ckpt_path, "no such checkpoint file")
    if record:
        details = {"resumed_from": str(ckpt_path)} if ckpt_path else {}
        write_status(run_dir, RUNNING, pid=os.getpid(), **details)
    try:
        with ddp_sweep_job(cfg.trainer):
            metrics = train(cfg, run_dir, ckpt_path=ckpt_path)
    except RunInterrupted as stop:
        if record:
            checkpoint = stop.checkpoint or newest_checkpoint(run_dir)
            write_status(
                run_dir,
                INTERRUPTED,
                signal=stop.signal_name,
                step=stop.step,
                epoch=stop.epoch,
                resume_from=str(checkpoint) if checkpoint else None,
                resume_command=f"python train.py resume={run_dir}",
            )
            log.warning("%s. Continue it with: python train.py resume=%s", stop, run_dir)
        raise SystemExit(stop.exit_code) from None
    except (KeyboardInterrupt, SystemExit):  # a second Ctrl-C; Lightning turns it into sys.exit
        if record:
            last = checkpoint_path(run_dir, LAST)
            write_status(run_dir, INTERRUPTED, resume_from=str(last) if last.is_file() else None)
        raise
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
    return metrics["test/loss"]


def main() -> None:
    """``python train.py`` / ``vae-train``: locks a run directory given on the command line and
    refuses one that holds a run or the user's own files, then runs Hydra."""
    run_dirs.lock_command_line_dir(sys.argv[1:])
    run_dirs.refuse_existing_run_dir(sys.argv[1:])
    _main()
