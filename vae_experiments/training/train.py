"""Builds data, model, trainer and logger from a composed config and runs fit + test."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, open_dict
from pytorch_lightning.utilities.exceptions import SIGTERMException

from vae_experiments.config_checks import (
    build_lr_scheduler,
    check_by_building,
    check_config,
    check_optimizer,
    choose_likelihood,
    cpu_processes,
    supply_model_args,
    trains_until_stopped,
)
from vae_experiments.cpu_memory import reuse_freed_cpu_memory
from vae_experiments.cpu_threads import AUTO as AUTO_THREADS
from vae_experiments.cpu_threads import use_threads
from vae_experiments.data.datamodule import ImageDataModule
from vae_experiments.runs import (
    BEST,
    CHECKPOINT_DIR,
    LAST,
    METRICS_FILE,
    build_model,
    checkpoint_path,
    is_first_process,
    read_group_choices,
    read_metrics,
    save_config,
    write_json_atomic,
)
from vae_experiments.targets import instantiate
from vae_experiments.training import lightning_compat
from vae_experiments.training.callbacks import (
    EpochLog,
    EpochTimer,
    ImageGrids,
    LastValidation,
    RunCheckpoint,
    StepProgressBar,
    shows_progress_bars,
)
from vae_experiments.training.checkpoint_io import AtomicCheckpointIO
from vae_experiments.training.code_prior_callback import CodePriorSamples
from vae_experiments.training.interrupt import Interruption, RunInterrupted
from vae_experiments.training.latent_callback import LatentSamples
from vae_experiments.training.lightning_compat import quiet_lightning_noise
from vae_experiments.training.module import LitModel
from vae_experiments.training.step_groups import steps_per_group, ungrouped_because
from vae_experiments.training.trackers import build_loggers, report_run

log = logging.getLogger(__name__)

#: Prefix of metrics.json keys that describe the run before it was resumed.
STALE_PREFIX = "stale/"


def stale_analysis_metrics(run_dir: Path, metrics: dict[str, float]) -> dict[str, float]:
    """What an earlier ``metrics.json`` of this run held beyond training's own ``metrics``
    (``test/log_px`` from evaluate.py, ...), as ``stale/<key>``: a run trained on after being
    analysed keeps those numbers, marked as describing the model before this resume."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return {}
    try:
        earlier = read_metrics(run_dir)
    except ValueError:  # unreadable: nothing to keep
        return {}
    stale = {
        key if key.startswith(STALE_PREFIX) else f"{STALE_PREFIX}{key}": value
        for key, value in earlier.items()
        if key not in metrics
    }
    if stale:
        log.warning(
            "kept the analysis of the run before this resume as %s: run the analysis again "
            "for the model trained on",
            ", ".join(sorted(stale)),
        )
    return stale


@quiet_lightning_noise()  # Lightning's warnings that say nothing to our users, during the run only
def train(
    cfg: DictConfig,
    run_dir: str | Path,
    ckpt_path: str | Path | None = None,
    parallel_jobs: int = 1,
) -> dict[str, float]:
    """Trains ``cfg.model`` on ``cfg.data``, tests the chosen checkpoint, writes ``metrics.json``.

    Args:
        cfg: the composed ``train.yaml`` config.
        run_dir: the run's own directory; checkpoints, logs, images and metrics go there.
        ckpt_path: a checkpoint to continue training from (model, optimizer, scheduler, loop
            position within the epoch and random number generators).
        parallel_jobs: jobs that a launcher runs at once on this machine, sharing its CPUs
            (``threads=auto`` gives each its share).

    Returns:
        The metrics written to ``metrics.json``.

    Raises:
        RunInterrupted: SIGINT, SIGTERM or SIGUSR1 stopped training; its checkpoint was saved.
    """
    run_dir = Path(run_dir)
    choose_likelihood(cfg)
    check_config(cfg)
    processes = cpu_processes(cfg)
    if processes is not None:
        log.warning(
            "trainer.strategy=%s with trainer.devices=%d and no GPU: %d processes on the CPU "
            "(gloo), each with a share of the cores; trainer=cpu trains in one",
            cfg.trainer.strategy,
            processes,
            processes,
        )
    if trains_until_stopped(cfg):
        log.warning(
            "trainer.max_epochs=-1: training runs until it is stopped (Ctrl-C or SIGTERM saves "
            "a checkpoint and stops; resume= continues it)"
        )
    reuse_freed_cpu_memory()  # large CPU batches (full-batch L-BFGS) at half the cost
    # DDP on the CPU (gloo) starts `processes` of this run, each taking its share too.
    use_threads(cfg.get("threads", AUTO_THREADS), parallel_jobs * (processes or 1))
    pl.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)

    # Everything is built before any data is read, so a bad value fails in a second: the data
    # object knows its image shape from its config alone, and the model, optimizer and schedule
    # are built once on the meta device (a model that needs labels on data without classes
    # fails here too). The model is built for real once the data is read, as some of its
    # arguments come from the data (the training set's size of a β-TCVAE).
    choices = read_group_choices(run_dir)
    check_by_building(cfg, choices)
    data = instantiate(cfg.data, key="data")
    datamodule = ImageDataModule(data)
    image_shape = [int(size) for size in data.image_shape]
    with open_dict(cfg):
        cfg.model.image_shape = image_shape
    # Read the data before building the trainer, so a missing or broken dataset fails first.
    # Downloads happen once per machine (local rank 0); other ranks start after it finished.
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        datamodule.prepare_data()
    datamodule.setup("fit")
    # The data reads no global random numbers: the model's initial weights are those of the
    # seed, as when it was built before the data.
    supply_model_args(cfg, data, choices)
    model = build_model(cfg)
    optimizer = instantiate(cfg.optimizer, key="optimizer")
    lr_scheduler = build_lr_scheduler(cfg.get("scheduler"))
    check_optimizer(model, optimizer, lr_scheduler)
    module = LitModel(
        model,
        optimizer,
        lr_scheduler=lr_scheduler,
        compile=cfg.compile,
        channels_last=cfg.channels_last,
    )
    log.info(
        "model %s with %d parameters, image shape %s",
        type(model).__name__,
        sum(p.numel() for p in model.parameters()),
        tuple(image_shape),
    )
    if is_first_process():
        # What load_run and resume= rebuild the run from; written once the data was read, so
        # that bad data (a DataError) changes nothing of a resumed run.
        save_config(run_dir, cfg)

    callbacks_cfg = cfg.callbacks
    # best.ckpt and last.ckpt are replaced in place (atomically), never versioned as
    # last-v1.ckpt: a resumed run, or the checkpoint an interruption wrote, keeps the names.
    best = RunCheckpoint(
        dirpath=run_dir / CHECKPOINT_DIR,
        filename=BEST,
        monitor=callbacks_cfg.checkpoint.monitor,
        mode=callbacks_cfg.checkpoint.mode,
        save_top_k=1,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    # Its own callback: with save_last, Lightning 2.6 rewrites last.ckpt only in the epochs
    # that improve best.ckpt, and a resume would repeat the epochs since.
    last = RunCheckpoint(
        dirpath=run_dir / CHECKPOINT_DIR,
        filename=LAST,
        monitor=None,
        save_top_k=1,
        enable_version_counter=False,
    )
    timer = EpochTimer()
    validation = LastValidation()
    interruption = Interruption(checkpoint_path(run_dir, LAST))
    callbacks: list[pl.Callback] = [
        timer,
        validation,
        EpochLog(),
        interruption,
        best,
        last,
        ImageGrids(callbacks_cfg.image_grids.num_images, run_dir / "images", data.class_names),
    ]
    latent_cfg = callbacks_cfg.get("latent_samples")
    code_prior: CodePriorSamples | None = None
    if latent_cfg is not None and latent_cfg.enabled and not model.has_prior:
        if model.discrete_codes:  # a VQ-VAE: its prior over code grids, after testing
            code_prior = CodePriorSamples(latent_cfg.num_samples, run_dir, seed=cfg.seed)
            callbacks.append(code_prior)
        else:
            callbacks.append(
                LatentSamples(
                    latent_cfg.num_samples,
                    latent_cfg.components,
                    run_dir / "images",
                    seed=cfg.seed,
                )
            )
    trainer_options = {}
    if cfg.trainer.get("enable_progress_bar", True) and shows_progress_bars():
        callbacks.append(StepProgressBar(refresh_rate=callbacks_cfg.progress_bar.refresh_rate))
    else:
        trainer_options["enable_progress_bar"] = False
    loggers = build_loggers(cfg, run_dir)
    if cfg.trainer.get("benchmark", "unset") is None:
        trainer_options["benchmark"] = not cfg.trainer.get("deterministic", False)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        key="trainer",
        **trainer_options,
        logger=loggers or False,
        callbacks=callbacks,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
    )
    module.check_processes(trainer.world_size)  # a model with an adversary: one process
    # Runs saved before the key existed trained one step at a time, and resume so.
    most = int(cfg.get("steps_per_group", 1))
    group = steps_per_group(most, trainer, data.splits["train"], optimizer, lr_scheduler, model)
    datamodule.groups_refused = ungrouped_because(
        trainer, data.splits["train"], optimizer, lr_scheduler, model
    )
    if group > 1 or datamodule.groups_refused is None:
        # Also at steps_per_group=1: a checkpoint made inside a grouped epoch ends it in groups.
        # Lightning counts groups as batches: the data module counts the epoch in batches.
        datamodule.steps_per_item = group
        limit = trainer.limit_train_batches
        datamodule.max_train_batches = None if limit == 1.0 and isinstance(limit, float) else limit
        trainer.limit_train_batches = 1.0

    with interruption.catching_signals(trainer):
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:
            signal_name = interruption.received or "SIGTERM"
            raise RunInterrupted(
                signal_name, interruption.saved, trainer.global_step, trainer.current_epoch
            ) from None
        finally:  # a fit that raised did not reach the module's on_fit_end
            lightning_compat.restore_nvml_cuda_check()

        # The last validation epoch's terms (what a search with optimized_metric=val/loss
        # compares) and the training's extent and times, over all sessions of a resumed run:
        # taken before the test, which restores the callbacks' state from the checkpoint it
        # tests. A session that only ran the test has them from its checkpoint.
        training = {
            **validation.metrics,
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "train_seconds": round(timer.train_seconds, 3),
            "seconds_per_epoch": round(timer.seconds_per_epoch or 0.0, 4),
            "world_size": trainer.world_size,
        }
        test_ckpt = best.best_model_path if cfg.test_ckpt == BEST else ""
        test_ckpt = test_ckpt or last.best_model_path or None
        try:
            if interruption.received:  # arrived as training ended: its checkpoints are written
                raise SIGTERMException
            results = trainer.test(
                module, datamodule=datamodule, ckpt_path=test_ckpt, verbose=False
            )
        except SIGTERMException:
            raise RunInterrupted(
                interruption.received or "SIGTERM",
                None,
                trainer.global_step,
                trainer.current_epoch,
                phase="testing",
            ) from None
    metrics: dict[str, float] = {key: float(value) for key, value in results[0].items()}
    metrics.update(training)
    if code_prior is not None:  # the prior's bits per code (the first process's)
        metrics.update(code_prior.results)
    metrics.update(stale_analysis_metrics(run_dir, metrics))
    if trainer.is_global_zero:
        write_json_atomic(run_dir / METRICS_FILE, metrics)
        report_run(loggers, cfg, run_dir, metrics)
        log.info("test metrics: %s", {k: round(v, 4) for k, v in metrics.items()})
        log.info("run directory: %s", run_dir)
    return metrics
