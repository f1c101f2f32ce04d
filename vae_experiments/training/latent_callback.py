"""At the end of training, sample an autoencoder through densities fitted to its latent codes."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from vae_experiments.analysis.latent import (
    DENSITIES,
    encode_split,
    fit_density,
    heldout_log_likelihood,
)
from vae_experiments.data import iterate_split
from vae_experiments.pictures import image_grid, save_grid

log = logging.getLogger(__name__)


class LatentSamples(pl.Callback):
    """After ``fit`` (global rank 0 only), for models without a prior (AEs): fits
    ``diag_gaussian`` and ``gmm`` densities to the training split's codes and decodes draws.

    Logs ``images/samples_diag_gaussian`` and ``images/samples_gmm`` to TensorBoard and saves
    them as ``samples_<density>.png`` in ``output_dir``; logs the validation codes' mean
    log-likelihood under each density (nats per code) as ``latent/log_lik_<density>`` to every
    logger. The values are also kept in :attr:`results`. Uses the model's final weights.

    Args:
        num_samples: images per grid (rows of ``ceil(sqrt(num_samples))``); 0 turns it off.
        components: mixture components of the ``gmm``.
        output_dir: folder for the PNGs (None: TensorBoard only).
        seed: seeds the mixture's EM and the draws.
        batch_size: images per batch when encoding (None: the data module's).
    """

    def __init__(
        self,
        num_samples: int,
        components: int,
        output_dir: str | Path | None,
        seed: int = 0,
        batch_size: int | None = None,
    ):
        super().__init__()
        if num_samples < 0 or components < 1:
            raise ValueError(
                f"callbacks.latent_samples: need num_samples >= 0 and components >= 1, got "
                f"num_samples={num_samples}, components={components}"
            )
        self.num_samples = num_samples
        self.components = components
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.seed = seed
        self.batch_size = batch_size
        self.results: dict[str, float] = {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        if self.num_samples == 0 or model.has_prior or not trainer.is_global_zero:
            return
        data = getattr(trainer.datamodule, "data", None)
        if data is None or data.splits is None:
            log.warning("latent samples skipped: the trainer has no set-up data module")
            return
        device = pl_module.device

        def codes_of(split: str) -> torch.Tensor:
            return encode_split(model, iterate_split(data, split, self.batch_size, device))

        train_codes, val_codes = codes_of("train"), codes_of("val")
        if len(train_codes) < self.components:
            log.warning(
                "latent samples skipped: %d training codes for a %d-component gmm",
                len(train_codes),
                self.components,
            )
            return
        per_row = math.ceil(math.sqrt(self.num_samples))
        tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        was_training = model.training
        model.eval()
        try:
            for kind in DENSITIES:
                density = fit_density(kind, train_codes, self.components, self.seed)
                self.results[f"latent/log_lik_{kind}"] = heldout_log_likelihood(density, val_codes)
                generator = torch.Generator().manual_seed(self.seed)
                with torch.no_grad():
                    images = model.decode(density.sample(self.num_samples, generator=generator))
                rows = list(images.split(per_row))
                grid = image_grid(rows, row_labels=[f"{kind} samples"] + [""] * (len(rows) - 1))
                for logger in tensorboards:
                    logger.experiment.add_image(f"images/samples_{kind}", grid, trainer.global_step)
                if self.output_dir is not None:
                    save_grid(grid, self.output_dir / f"samples_{kind}.png")
        finally:
            model.train(was_training)
        for logger in trainer.loggers:
            logger.log_metrics(self.results, step=trainer.global_step)
        log.info(
            "validation codes' log-likelihood (nats per code): %s",
            {k: round(v, 3) for k, v in self.results.items()},
        )
