"""At the end of training, fit a VQ-VAE's prior over code grids (its second stage) and sample
through it."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger

from vae_experiments.analysis.code_prior import (
    encode_splits,
    fit_code_priors,
    prior_metrics,
    sample_grid,
)
from vae_experiments.pictures import save_grid
from vae_experiments.runs import IMAGES_DIR
from vae_experiments.runs.load import check_checkpoint
from vae_experiments.runs.priors import fitted_to, save_prior

log = logging.getLogger(__name__)


class CodePriorSamples(pl.Callback):
    """After testing (global rank 0 only), for models with code grids (VQ-VAE): fits the
    model's prior (``model.prior``) and the per-position code frequencies (the baseline) to the
    training split's codes of the tested checkpoint, and

    - saves the model's prior as the run's ``prior.pt`` (:mod:`~vae_experiments.runs.priors`),
      marked with that checkpoint's step, so ``load_run`` of it gets the prior;
    - decodes draws from each as ``images/samples_<prior>.png`` and TensorBoard's
      ``images/samples_<prior>``;
    - measures bits per code on the validation and test codes: :attr:`results`
      (``test/prior_bits_per_code``, ``test/frequencies_bits_per_code``, ``val/...``), which
      training adds to ``metrics.json`` and logs to every logger.

    After testing rather than after fitting: the test checkpoint (``test_ckpt``, best by default)
    is the one ``load_run`` and the analysis commands load by default.

    Args:
        num_samples: images per grid (rows of ``ceil(sqrt(num_samples))``; 0: the prior is
            fitted and measured, and no grid drawn).
        run_dir: the run directory (``prior.pt``, ``images/``).
        seed: seeds the prior's fit and the draws.
        batch_size: images per batch when encoding (None: the data's).
    """

    def __init__(
        self, num_samples: int, run_dir: str | Path, seed: int = 0, batch_size: int | None = None
    ):
        super().__init__()
        if num_samples < 0:
            raise ValueError(
                f"callbacks.latent_samples.num_samples must be >= 0, got {num_samples}"
            )
        self.num_samples = num_samples
        self.run_dir = Path(run_dir)
        self.seed = seed
        self.batch_size = batch_size
        self.results: dict[str, float] = {}

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        if not trainer.is_global_zero or not model.discrete_codes:
            return
        data = getattr(trainer.datamodule, "data", None)
        if data is None or data.splits is None:
            log.warning("the prior over codes was not fitted: the trainer has no set-up data")
            return
        # The weights tested: the test checkpoint's, or (none written) the final ones.
        checkpoint = trainer.ckpt_path
        step = check_checkpoint(checkpoint)[0] if checkpoint else trainer.global_step
        weights = fitted_to(self.run_dir, checkpoint, step)
        was_training = model.training
        model.eval()
        try:
            log.info(
                "fitting the prior over codes %r to the codes of %s (step %d)",
                model.prior_recipe,
                weights["checkpoint"] or "the final weights",
                step,
            )
            codes = encode_splits(model, data, batch_size=self.batch_size)
            fitted = fit_code_priors(model, codes, seed=self.seed)
            first = fitted[0]
            path = save_prior(
                self.run_dir,
                first.prior,
                first.recipe,
                weights,
                first.bits_per_code,
            )
            tensorboards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
            for each in fitted if self.num_samples else []:
                _, grid = sample_grid(
                    model, each.prior, self.num_samples, self.seed, f"{each.name} samples"
                )
                for logger in tensorboards:
                    logger.experiment.add_image(
                        f"images/samples_{each.name}", grid, trainer.global_step
                    )
                save_grid(grid, self.run_dir / IMAGES_DIR / f"samples_{each.name}.png")
        finally:
            model.train(was_training)
        self.results = prior_metrics(fitted)
        for logger in trainer.loggers:
            logger.log_metrics(self.results, step=trainer.global_step)
        log.info(
            "prior over codes saved to %s; bits per code (log2 K = %.2f for a uniform guess): %s",
            path,
            math.log2(model.num_codes),
            {key: round(value, 4) for key, value in self.results.items()},
        )
