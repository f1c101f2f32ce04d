"""Builds data, model, trainer and logger from a composed config and runs fit + test."""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.loggers import Logger, TensorBoardLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from vae_experiments import targets
from vae_experiments.data.datamodule import ImageDataModule
from vae_experiments.runs import CHECKPOINT_DIR, METRICS_FILE, write_json_atomic
from vae_experiments.training.callbacks import EpochTimer, ImageGrids, RunCheckpoint
from vae_experiments.training.checkpoint_io import AtomicCheckpointIO
from vae_experiments.training.config_checks import check_config, check_model_fits_data
from vae_experiments.training.interrupt import Interruption, RunInterrupted
from vae_experiments.training.latent_callback import LatentSamples
from vae_experiments.training.module import LitModel

log = logging.getLogger(__name__)
# Resuming: our data module restores the position in the epoch itself (Lightning looks for it
# on the DataLoader), and the checkpoint folder of the run being resumed is meant to be full.
warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before")
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
# ckpt_path= from another run: its checkpoint callbacks' state stays with that run, as it should.
warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
# Lightning advertises a cloud logger on every run; keep our users' logs about their runs.
logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(
    lambda record: "litlogger" not in record.getMessage()
)


def build_logger(cfg: DictConfig | None, run_dir: Path) -> Logger | None:
    """The ``logger=`` group's logger writing under ``run_dir``; None for ``logger=none``."""
    if not cfg or cfg.get("_target_") is None:
        return None
    return instantiate(cfg, save_dir=str(run_dir))


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The config as ``{"model.latent_dim": 16, ...}`` with scalar values, for the HPARAMS tab."""
    flat: dict[str, Any] = {}

    def visit(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                visit(value, f"{prefix}{key}.")
        else:
            is_scalar = isinstance(node, int | float | str | bool)
            flat[prefix[:-1]] = node if is_scalar else str(node)

    container = OmegaConf.to_container(cfg, resolve=True)
    container = {k: v for k, v in container.items() if k != "hydra"}
    visit(container, "")
    return flat


def log_hparams(logger: Logger, cfg: DictConfig, metrics: dict[str, float]) -> None:
    """Records the flattened config; TensorBoard also gets the test metrics (HPARAMS tab)."""
    if isinstance(logger, TensorBoardLogger):
        test_metrics = {k: v for k, v in metrics.items() if k.startswith("test/")}
        logger.log_hyperparams(flat_hparams(cfg), metrics=test_metrics)
    else:
        logger.log_hyperparams(flat_hparams(cfg))


def train(
    cfg: DictConfig, run_dir: str | Path, ckpt_path: str | Path | None = None
) -> dict[str, float]:
    """Trains ``cfg.model`` on ``cfg.data``, tests the chosen checkpoint, writes ``metrics.json``.

    Args:
        cfg: the composed ``train.yaml`` config.
        run_dir: the run's own directory; checkpoints, logs, images and metrics go there.
        ckpt_path: a checkpoint to continue training from (model, optimizer, scheduler, loop
            position within the epoch and random number generators).

    Returns:
        The metrics written to ``metrics.json``.

    Raises:
        RunInterrupted: SIGINT, SIGTERM or SIGUSR1 stopped training; its checkpoint was saved.
    """
    run_dir = Path(run_dir)
    check_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision", "highest"))

    data = targets.instantiate(cfg.data, key="data")
    datamodule = ImageDataModule(data)
    check_model_fits_data(cfg.model, data.image_shape, data.value_range, data.name)
    # Read the data before building anything else, so a missing or broken dataset fails first.
    # Downloads happen once per machine (local rank 0); other ranks start after it finished.
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        datamodule.prepare_data()
    datamodule.setup("fit")
    image_shape = list(datamodule.image_shape)
    model = instantiate(cfg.model, image_shape=image_shape, _convert_="all")
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    module = LitModel(
        model,
        instantiate(cfg.optimizer),
        image_shape,
        lr_scheduler=scheduler,
        compile=cfg.get("compile", False),
        channels_last=cfg.get("channels_last", False),
    )
    log.info(
        "model %s with %d parameters, image shape %s",
        type(model).__name__,
        sum(p.numel() for p in model.parameters()),
        tuple(image_shape),
    )

    callbacks_cfg = cfg.callbacks
    # best.ckpt and last.ckpt are replaced in place (atomically), never versioned as
    # last-v1.ckpt: a resumed run, or the checkpoint an interruption wrote, keeps the names.
    best = RunCheckpoint(
        dirpath=run_dir / CHECKPOINT_DIR,
        filename="best",
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
        filename="last",
        monitor=None,
        save_top_k=1,
        enable_version_counter=False,
    )
    timer = EpochTimer()
    interruption = Interruption(run_dir / CHECKPOINT_DIR / "last.ckpt")
    callbacks: list[pl.Callback] = [
        timer,
        interruption,
        best,
        last,
        ImageGrids(callbacks_cfg.image_grids.num_images, run_dir / "images"),
    ]
    latent_cfg = callbacks_cfg.get("latent_samples")
    if latent_cfg is not None and latent_cfg.enabled and not model.has_prior:
        callbacks.append(
            LatentSamples(
                latent_cfg.num_samples, latent_cfg.components, run_dir / "images", seed=cfg.seed
            )
        )
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(TQDMProgressBar(refresh_rate=callbacks_cfg.progress_bar.refresh_rate))
    logger = build_logger(cfg.get("logger"), run_dir)
    trainer_options = {}
    if cfg.trainer.get("benchmark", "unset") is None:
        trainer_options["benchmark"] = not cfg.trainer.get("deterministic", False)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        **trainer_options,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
    )

    start = time.perf_counter()
    with interruption.catching_signals(trainer):
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:
            signal_name = interruption.received or "SIGTERM"
            raise RunInterrupted(
                signal_name, interruption.saved, trainer.global_step, trainer.current_epoch
            ) from None
    train_seconds = time.perf_counter() - start

    test_ckpt = best.best_model_path if cfg.test_ckpt == "best" else ""
    test_ckpt = test_ckpt or last.best_model_path or None
    results = trainer.test(module, datamodule=datamodule, ckpt_path=test_ckpt, verbose=False)
    metrics: dict[str, float] = {key: float(value) for key, value in results[0].items()}
    metrics.update(
        epochs=trainer.current_epoch,
        steps=trainer.global_step,
        train_seconds=round(train_seconds, 3),
        seconds_per_epoch=round(timer.seconds_per_epoch or 0.0, 4),
        world_size=trainer.world_size,
    )
    if trainer.is_global_zero:
        write_json_atomic(run_dir / METRICS_FILE, metrics)
        if logger is not None:
            log_hparams(logger, cfg, metrics)
            logger.finalize("success")
        log.info("test metrics: %s", {k: round(v, 4) for k, v in metrics.items()})
        log.info("run directory: %s", run_dir)
    return metrics
