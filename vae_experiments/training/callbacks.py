"""Callbacks: image grids for TensorBoard and as PNG files; epoch timing; checkpoints; the
progress bar."""

from __future__ import annotations

import logging
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import TensorBoardLogger

from vae_experiments.pictures import image_grid, save_grid
from vae_experiments.training import lightning_compat

log = logging.getLogger(__name__)


class ImageGrids(pl.Callback):
    """After every validation epoch (global rank 0 only): originals over reconstructions, and for
    models with a prior, samples, each row labelled with what it is (``input``,
    ``reconstruction``, ``prior sample``). Logged to TensorBoard and saved as PNG in
    ``output_dir``.

    A model conditioned on class labels reconstructs with the images' labels and draws one row
    of samples per class, labelled with its name; every row decodes the same latent draws, so
    a column shows one z across the classes.

    The same validation images and the same latent draws are used every epoch, so the grids show
    how the model changes.

    Args:
        num_images: images per row (0: no grids).
        output_dir: where the PNG files go (None: TensorBoard only).
        class_names: the data's classes (the labels index them), for the rows of a conditional
            model's samples; None: the rows are labelled with the class numbers.
    """

    def __init__(
        self,
        num_images: int,
        output_dir: str | Path | None,
        class_names: Sequence[str] | None = None,
    ):
        super().__init__()
        self.num_images = num_images
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.class_names = list(class_names) if class_names is not None else None
        self._images: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ):
        if batch_idx == 0 and self._images is None and self.num_images > 0:
            self._images = batch[0][: self.num_images].detach().clone()
            self._labels = batch[1][: self.num_images].detach().clone()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self._images is None:
            return
        model = pl_module.model
        images, labels = self._images, self._labels
        with torch.no_grad():
            recon = model.reconstruct(images, labels)
            grids = {
                "reconstructions": image_grid(
                    [images, recon], row_labels=["input", "reconstruction"]
                )
            }
            if model.has_prior and model.needs_labels:
                grids["samples"] = self._class_rows(model, images.shape[0], images.device)
            elif model.has_prior:
                generator = torch.Generator(device=images.device).manual_seed(0)
                samples = model.sample(images.shape[0] * 2, generator=generator)
                grids["samples"] = image_grid(
                    list(samples.chunk(2)), row_labels=["prior sample", "prior sample"]
                )
        for name, grid in grids.items():
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(f"images/{name}", grid, trainer.global_step)
            if self.output_dir is not None:
                save_grid(grid, self.output_dir / f"{name}.png")

    def _class_rows(
        self, model: torch.nn.Module, per_row: int, device: torch.device
    ) -> torch.Tensor:
        """A grid of ``per_row`` samples of each class, a row per class, labelled."""
        classes = range(model.num_classes)
        rows = []
        for label in classes:
            # Seeded alike for every row: the same z in each column, only the class changes.
            generator = torch.Generator(device=device).manual_seed(0)
            y = torch.full((per_row,), label, dtype=torch.int64, device=device)
            rows.append(model.sample(per_row, generator=generator, y=y))
        names = self.class_names or [str(label) for label in classes]
        return image_grid(rows, row_labels=[names[label] for label in classes])


class EpochTimer(pl.Callback):
    """Wall time of every training epoch, from the end of the one before (from its own start for
    a session's first epoch) to its own end, validation pass and image grids included, and the
    process's CPU time over the same span (``time.process_time``: all its threads; what
    ``scripts/benchmark.py --clock cpu`` compares); and the run's training time in all, over
    every resume (all three are kept in checkpoints).

    An epoch ends here before its checkpoints are written (Lightning runs checkpoint callbacks
    last), so the checkpoint of an epoch holds that epoch's time too: a run stopped in its final
    test and continued reports the times its training took. An epoch's checkpoint writing is
    counted in the next epoch. An epoch cut by an interruption is not counted as an epoch, nor
    is the rest of one that a resumed run finishes (their time is in the total).
    """

    def __init__(self) -> None:
        super().__init__()
        self.epoch_seconds: list[float] = []
        self.epoch_cpu_seconds: list[float] = []
        self._start: float | None = None
        self._cpu_start = 0.0
        self._seconds_before: float = 0.0  # training time of the sessions before this one
        self._fit_start: float | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._start is None:  # a session's first epoch
            self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now, cpu_now = time.perf_counter(), time.process_time()
        if self._start is not None:
            self.epoch_seconds.append(now - self._start)
            self.epoch_cpu_seconds.append(cpu_now - self._cpu_start)
        self._start, self._cpu_start = now, cpu_now

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seconds_before = self.train_seconds
        self._fit_start = None

    @property
    def train_seconds(self) -> float:
        """Seconds spent in training (``trainer.fit``) so far, this session and those before."""
        running = time.perf_counter() - self._fit_start if self._fit_start is not None else 0.0
        return self._seconds_before + running

    @property
    def seconds_per_epoch(self) -> float | None:
        """Median epoch time; the first epoch (warm-up: allocation, compilation) is left out
        when there are others."""
        times = self.epoch_seconds[1:] if len(self.epoch_seconds) > 1 else self.epoch_seconds
        return statistics.median(times) if times else None

    def state_dict(self) -> dict[str, Any]:
        return {
            "train_seconds": self.train_seconds,
            "epoch_seconds": list(self.epoch_seconds),
            "epoch_cpu_seconds": list(self.epoch_cpu_seconds),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._seconds_before = float(state_dict.get("train_seconds", 0.0))
        self.epoch_seconds = [float(t) for t in state_dict.get("epoch_seconds", [])]
        # Checkpoints written before CPU times were kept have none.
        self.epoch_cpu_seconds = [float(t) for t in state_dict.get("epoch_cpu_seconds", [])]


class LastValidation(pl.Callback):
    """The ``val/*`` terms of the last validation pass (not the sanity check), as floats, kept
    in checkpoints: what ``metrics.json`` reports as the run's validation scores, also when a
    resumed run validates nothing (it was stopped in its final test). One host sync per pass."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, float] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        self.metrics = {key: float(v) for key, v in metrics.items() if key.startswith("val/")}

    def state_dict(self) -> dict[str, Any]:
        return {"metrics": dict(self.metrics)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.metrics = {str(k): float(v) for k, v in state_dict.get("metrics", {}).items()}


class EpochLog(pl.Callback):
    """One line per training epoch in the run's log (``train.log``), so that a job on a cluster
    can be followed from its log: ``epoch 3/30 (step 120): train/loss=... val/loss=...``, with
    the epoch's last ``train/loss`` point and its validation terms (global rank 0 only).

    Written when the next epoch starts or training ends: the epoch's own metrics reach the
    trainer after every ``on_train_epoch_end`` hook has run.
    """

    def __init__(self) -> None:
        super().__init__()
        self._finished: int | None = None  # the epoch whose line is due

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finished = trainer.current_epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer)

    def _write(self, trainer: pl.Trainer) -> None:
        epoch, self._finished = self._finished, None
        if epoch is None or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics  # host values once per epoch
        shown = [key for key in ("train/loss",) if key in metrics]
        shown += sorted(key for key in metrics if key.startswith("val/"))
        terms = " ".join(f"{key}={float(metrics[key]):.5g}" for key in shown)
        limit = trainer.max_epochs if trainer.max_epochs not in (None, -1) else "?"
        log.info("epoch %d/%s (step %d): %s", epoch + 1, limit, trainer.global_step, terms)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose state key is built once: Lightning formats it for every hook of
    every step (its profiler's action names), and ModelCheckpoint's is a dict's repr. Without
    ``every_n_train_steps`` or ``train_time_interval`` (how the run's checkpoints are made: at
    the end of validation or of the epoch) its per-step hook returns at once."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._saves_within_epochs = bool(
            kwargs.get("every_n_train_steps") or kwargs.get("train_time_interval") is not None
        )

    @property
    def state_key(self) -> str:
        return lightning_compat.fixed_state_key(self)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        # ModelCheckpoint's own checks reach the same "nothing to save" after a dozen attribute
        # look-ups, every step.
        if self._saves_within_epochs:
            super().on_train_batch_end(trainer, pl_module, *args)


def shows_progress_bars() -> bool:
    """Whether a progress bar can be seen where this process writes: a terminal, or a Jupyter
    notebook. In a log file or a pipe (a cluster job, a sweep's worker, ``> train.log``) every
    refresh of a bar stays as text, hundreds of lines per run; the per-epoch lines
    (:class:`EpochLog`) say the same there."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) or "ipykernel" in sys.modules


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar, counting a training epoch in optimizer steps also when the
    data module yields groups of batches (``steps_per_group``), where Lightning counts groups.

    ``refresh_rate`` is in steps: the bar moves when a multiple of it was passed.
    """

    _shown = 0  # steps of the epoch the bar shows

    def _steps_done(self, trainer: pl.Trainer, batch_idx: int) -> int:
        datamodule = getattr(trainer, "datamodule", None)
        if hasattr(datamodule, "train_batches_done"):
            return datamodule.train_batches_done(trainer.current_epoch)
        return batch_idx + 1

    @property
    def total_train_batches(self) -> int | float:
        datamodule = getattr(self.trainer, "datamodule", None)
        if getattr(datamodule, "counts_steps_itself", False):
            return datamodule.train_batches_per_epoch
        return super().total_train_batches

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # A run resumed inside an epoch gets no on_train_epoch_start for it: the bar is set here.
        self._start_epoch(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._start_epoch(trainer)

    def _start_epoch(self, trainer: pl.Trainer) -> None:
        """The bar at the epoch's steps done so far (part-way in a resumed epoch), out of its
        steps, named after the epoch."""
        bar = self.train_progress_bar
        self._shown = self._steps_done(trainer, -1)
        if bar is None or bar.disable:
            return
        total = self.total_train_batches
        bar.total = None if total == float("inf") else total
        bar.set_description(f"Epoch {trainer.current_epoch}")
        bar.reset(total=bar.total)
        bar.initial = bar.n = self._shown  # the rate counts this session's steps only
        bar.refresh()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable:
            return
        done = self._steps_done(trainer, batch_idx)
        shown, self._shown = self._shown, done
        if done // self.refresh_rate > shown // self.refresh_rate or done == bar.total:
            bar.n = done
            bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))
