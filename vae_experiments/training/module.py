"""The one LightningModule: trains any model through its ``loss`` and logs every term."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn

from vae_experiments.analysis.likelihood import ACTIVE_UNIT_THRESHOLD, ActiveUnits
from vae_experiments.data.batches import BatchGroup
from vae_experiments.models import LatentModel
from vae_experiments.models.adversary import ADVERSARY_LOSS, has_adversary, split_parameters
from vae_experiments.targets import ConfigError
from vae_experiments.training import lightning_compat
from vae_experiments.training.optimizer_settings import (
    apply_changed_settings,
    build_optimizer,
    configured_settings,
)

log = logging.getLogger(__name__)

OptimizerFactory = Callable[..., torch.optim.Optimizer]
#: Checkpoint entry with the optimizer and scheduler settings the run's config gave.
SETTINGS_KEY = "configured_settings"
NEVER = torch.iinfo(torch.int64).max  # the "first non-finite step" of a term that never was
#: Validations in a row with no active latent unit (after any KL warm-up) before the log says
#: "posterior collapse", at the least: a VAE often starts with none and opens units within a few
#: epochs (the README's MLP VAE on digits has none until its fifth).
COLLAPSE_PATIENCE = 3
#: ... and at least this share of the run's epochs (a 30-epoch run waits 6 validations).
COLLAPSE_PATIENCE_SHARE = 0.2


def collapse_patience(max_epochs: int | None) -> int:
    """Validations in a row with no active unit before the collapse warning in a run of
    ``max_epochs`` (None or -1: no limit): :data:`COLLAPSE_PATIENCE`, or a
    :data:`COLLAPSE_PATIENCE_SHARE` of the epochs where that is more."""
    if max_epochs is None or max_epochs < 1:
        return COLLAPSE_PATIENCE
    return max(COLLAPSE_PATIENCE, math.ceil(COLLAPSE_PATIENCE_SHARE * max_epochs))


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss term (or non-finite weights) and was stopped before
    a checkpoint could hold the broken weights. The message says when, which terms, which
    checkpoint is the last good one, and what to try."""


@dataclass(frozen=True)
class NonFiniteTerms:
    """The first step at which some loss terms were not finite, and their values there.

    Attributes:
        step: the global step (as passed to :meth:`TermMeans.add`).
        values: the terms that were non-finite at ``step``, in the model's order, with their
            values (nan, inf or -inf).
    """

    step: int
    values: dict[str, float]

    def describe(self, prefix: str = "") -> str:
        """``"train/recon and train/loss became nan, train/kl became inf"``."""
        by_value: dict[str, list[str]] = {}
        for name, value in self.values.items():
            by_value.setdefault(str(value), []).append(f"{prefix}{name}")
        return ", ".join(f"{_and(names)} became {value}" for value, names in by_value.items())


class CollapseWatch:
    """When the log says "posterior collapse", from the count of active latent units after each
    validation: when no unit has been active for ``patience`` validations in a row and any KL
    warm-up is over (a VAE often starts with none and opens units within a few epochs), or at
    the end of a run that ends with none, once per collapse; and, after such a warning, when
    units are active again.

    Args:
        patience: validations in a row with no active unit before the warning.
    """

    def __init__(self, patience: int = COLLAPSE_PATIENCE) -> None:
        self.patience = patience
        self.streak = 0  # validations in a row with no active unit
        self.since = 0  # the epoch of the first of them
        self.reported = False  # whether the log said "posterior collapse" for this streak

    def update(self, active: int, epoch: int, warmup_over: bool = True) -> str | None:
        """Takes a validation's count; returns ``"collapsed"`` when the log should warn,
        ``"recovered"`` when it should say that units opened up after a warning, else None."""
        if active > 0:
            recovered, self.streak, self.reported = self.reported, 0, False
            return "recovered" if recovered else None
        if self.streak == 0:
            self.since = epoch
        self.streak += 1
        if self.streak >= self.patience and warmup_over and not self.reported:
            self.reported = True
            return "collapsed"
        return None

    def at_end(self) -> bool:
        """Whether the end of training should warn: the run ends with no active unit and the
        log has not said so yet."""
        if self.streak and not self.reported:
            self.reported = True
            return True
        return False


def _and(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


class TermMeans:
    """Running image-weighted means of named loss terms, kept on the device: adding a batch
    keeps its (detached) terms and launches no kernel; they are summed in one go when the means
    or the record below are read (at most every :data:`FOLD_EVERY` batches otherwise), so a
    step costs no host sync and next to no time.

    Batches may bring different sets of terms (a training step that nobody logs leaves the
    monitoring terms out: ``model.loss(..., monitor=False)``): each term's mean is over the
    images of the batches that had it.

    Given the step, :meth:`add` also has the first step at which each term was not finite, and
    its value there, recorded on the device; :meth:`first_nonfinite` reads that record (a sync).
    """

    #: Batches kept before they are summed, whether or not anything is read.
    FOLD_EVERY = 256

    def __init__(self) -> None:
        self.names: list[str] = []  # every term seen, in the order first seen
        self._sums: torch.Tensor | None = None  # (num_terms,): sums weighted by batch size
        self._counts: list[int] = []  # images added per term: host integers, no tensor needed
        # Added and not yet summed: (names, terms, batch size, step or None) per batch.
        self._pending: list[tuple[tuple[str, ...], tuple[torch.Tensor, ...], int, int | None]] = []
        self._first_bad_step: torch.Tensor | None = None  # (num_terms,) int64; NEVER if finite
        self._first_bad_value: torch.Tensor | None = None  # (num_terms,): the value at that step

    def reset(self) -> None:
        """Starts the means afresh; the record of non-finite steps is kept."""
        self._fold()
        self._sums = None
        self._counts = [0] * len(self.names)

    def add(
        self, terms: Mapping[str, torch.Tensor], batch_size: int, step: int | None = None
    ) -> None:
        """Adds a batch's terms (each a scalar mean over its ``batch_size`` images); with
        ``step``, records which of them are not finite at that step."""
        # detach: a kept term must not keep its batch's autograd graph alive.
        values = tuple(value.detach() for value in terms.values())
        self._pending.append((tuple(terms), values, batch_size, step))
        if len(self._pending) >= self.FOLD_EVERY:
            self._fold()

    def _columns(self, names: tuple[str, ...]) -> list[int]:
        """The positions of ``names`` in :attr:`names`, added where new (the sums and records
        grown to match)."""
        new = [name for name in names if name not in self.names]
        if new:
            self.names += new
            self._counts += [0] * len(new)
            grow = len(new)
            if self._sums is not None:
                self._sums = torch.cat([self._sums, self._sums.new_zeros(grow)])
            if self._first_bad_step is not None:
                self._first_bad_step = torch.cat(
                    [self._first_bad_step, self._first_bad_step.new_full((grow,), NEVER)]
                )
                self._first_bad_value = torch.cat(
                    [self._first_bad_value, self._first_bad_value.new_zeros(grow)]
                )
        return [self.names.index(name) for name in names]

    def _fold(self) -> None:
        """Sums the pending batches into the means and the non-finite record (a few kernels per
        set of terms, no sync)."""
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        by_names: dict[tuple[str, ...], list] = {}
        for row in rows:
            by_names.setdefault(row[0], []).append(row)
        for names, group in by_names.items():
            # (batches, terms) in float32 whatever the precision the terms came in.
            values = torch.stack([value.float() for _, terms, _, _ in group for value in terms])
            values = values.view(len(group), len(names))
            positions = self._columns(names)
            columns = torch.tensor(positions, device=values.device)
            sizes = [size for _, _, size, _ in group]
            weights = torch.tensor(sizes, dtype=values.dtype).to(values.device, non_blocking=True)
            sums = (values * weights[:, None]).sum(0)
            if self._sums is None:
                self._sums = values.new_zeros(len(self.names))
            self._sums.index_add_(0, columns, sums)
            for position in positions:
                self._counts[position] += sum(sizes)
            stepped = [index for index, (_, _, _, step) in enumerate(group) if step is not None]
            if stepped:
                steps = torch.tensor([group[index][3] for index in stepped], dtype=torch.int64)
                steps = steps.to(values.device, non_blocking=True)
                if len(stepped) < len(group):
                    values = values[stepped]
                self._record_nonfinite(values, steps, columns)

    def _record_nonfinite(
        self, values: torch.Tensor, steps: torch.Tensor, columns: torch.Tensor
    ) -> None:
        """Merges the first non-finite step of each term in ``values`` (batches, terms), taken
        at ``steps`` (batches,), into the record at ``columns`` (terms,)."""
        bad_steps = torch.where(torch.isfinite(values), NEVER, steps[:, None])
        first_steps, first_rows = bad_steps.min(0)  # (terms,) each
        first_values = values.gather(0, first_rows[None]).squeeze(0)
        if self._first_bad_step is None:
            self._first_bad_step = first_steps.new_full((len(self.names),), NEVER)
            self._first_bad_value = first_values.new_zeros(len(self.names))
        known_steps = self._first_bad_step[columns]
        first = first_steps < known_steps
        self._first_bad_step[columns] = torch.where(first, first_steps, known_steps)
        self._first_bad_value[columns] = torch.where(
            first, first_values, self._first_bad_value[columns]
        )

    def first_nonfinite(self, strategy: Any = None) -> NonFiniteTerms | None:
        """The first recorded step at which any term was not finite, over all processes when
        ``strategy`` is given (its ``all_gather`` is a collective: call it on every process);
        None if every term was finite."""
        self._fold()
        if self._first_bad_step is None:
            return None
        steps, values = self._first_bad_step, self._first_bad_value
        if strategy is not None:
            steps, values = strategy.all_gather(steps), strategy.all_gather(values)
        # (processes, num_terms) on the host: one sync.
        num_terms = len(self.names)
        steps = steps.reshape(-1, num_terms).tolist()
        values = values.reshape(-1, num_terms).tolist()
        first = min(min(row) for row in steps)
        if first == NEVER:
            return None
        bad = {}
        for process_steps, process_values in zip(steps, values, strict=True):
            for name, term_step, value in zip(
                self.names, process_steps, process_values, strict=True
            ):
                if term_step == first:
                    bad.setdefault(name, value)
        return NonFiniteTerms(first, {name: bad[name] for name in self.names if name in bad})

    def pop(self, strategy: Any = None) -> dict[str, torch.Tensor]:
        """The means since the last reset (summed over processes through ``strategy.reduce`` when
        given), and a reset: each term's over the images of the batches that had it, the terms
        no batch had since the reset left out. Empty when nothing was added."""
        self._fold()
        if self._sums is None:
            return {}
        counts = torch.tensor(self._counts, dtype=self._sums.dtype).to(self._sums.device)
        sums = torch.stack([self._sums, counts])  # (2, num_terms)
        if strategy is not None:
            sums = strategy.reduce(sums, reduce_op="sum")
        had = [index for index, count in enumerate(self._counts) if count]
        self.reset()
        means = sums[0] / sums[1]
        return {self.names[index]: means[index] for index in had}


class LitModel(pl.LightningModule):
    """Wraps a :class:`LatentModel` for CPU, GPU and multi-GPU/multi-node training.

    Each batch is (images, labels); both go to ``model.loss(x, y=labels, step=...)`` (a model
    that needs no labels ignores them). Every term of ``model.loss`` is logged as ``{stage}/{name}`` (``train/loss``, ``val/elbo``, ...):
    training terms every ``trainer.log_every_n_steps`` steps as the mean over those steps (and
    at each epoch's end over the steps since, so that every epoch has a point),
    validation and test terms once per epoch as the mean over all images of all processes.
    Terms are accumulated on the device, so a step costs no host sync and no logging call.
    Training steps whose point is not written (all but the logging step and the epoch's last)
    call ``model.loss(..., monitor=False)``: the objective's terms (``loss``, ``recon``,
    ``kl``, ...) are means over every step, the monitoring terms (``elbo``, ``recon_mse``) those
    of the steps that wrote the point.

    Training batches may come in groups of S batches (:class:`BatchGroup`) from the data module
    (``steps_per_group``, :mod:`~vae_experiments.training.step_groups`): one optimizer step
    each, the first S - 1 taken here, the last by Lightning, with the same weights as one batch
    at a time. Lightning's ``batch_idx`` then counts groups; ``global_step`` counts steps.

    A non-finite training term stops training with :class:`NonFiniteLossError`. The device
    records the first step at which a term was not finite; the host reads that record where it
    syncs anyway (each logging interval) and before anything can write a checkpoint (the last
    batch of an epoch, the start of validation, the end of the training epoch), where it also
    checks the weights. So no checkpoint holds weights trained through a non-finite loss.
    Non-finite validation and test terms are logged as warnings.

    A model with an adversary (:mod:`~vae_experiments.models.adversary`: FactorVAE's
    discriminator; an adversarial AE's or a VAE-GAN's would fit the same shape) gets two
    optimizers: ``optimizer`` over its own parameters, its ``adversary_optimizer`` over its
    :meth:`adversary_parameters`. Lightning 2.x steps several optimizers only under manual
    optimization, which this module uses for such models only: each batch, one ``loss`` call,
    then the model's step on ``loss`` and the adversary's on ``adversary_loss``
    (:meth:`_adversarial_step`). ``global_step`` counts the model's steps (batches), as for
    every other model; both optimizers' states are in every checkpoint and restored on resume;
    signals stop after the step, as for any model; the non-finite checks are the same. Refused
    with the config, by name (``config_checks.adversary_problems``): an lr scheduler, gradient
    clipping and accumulation, 16-bit precision's gradient scaler, L-BFGS; and several
    processes (DDP) when training starts. Groups of batches fall back to one batch per pass
    (``step_groups``, with the reason logged).

    Args:
        model: the model to train.
        optimizer: a partial optimizer (Hydra ``_partial_: true``) taking the parameters.
        lr_scheduler: optional Lightning lr-scheduler dict whose ``scheduler`` is a partial taking
            the optimizer; other keys (``interval``, ``monitor``, ...) are passed to Lightning.
        compile: run the encoder and decoder through ``torch.compile`` (training batches all have
            the same shape; evaluation's last partial batch and no-grad mode compile once more).
        channels_last: store conv weights and input batches in NHWC memory format.
    """

    def __init__(
        self,
        model: LatentModel,
        optimizer: OptimizerFactory,
        lr_scheduler: Mapping[str, Any] | None = None,
        compile: bool = False,
        channels_last: bool = False,
    ):
        super().__init__()
        self.channels_last = channels_last
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        # Two optimizers: Lightning steps them only under manual optimization (this module does).
        self.automatic_optimization = not has_adversary(model)
        if compile:
            # The networks, not the loss: the loss branches on Python values (the step of a KL
            # warm-up, train/eval), which would recompile; the networks see only fixed shapes.
            # Module.compile() compiles in place, so checkpoint keys do not change.
            for name in ("encoder", "decoder"):
                network = getattr(model, name, None)
                if isinstance(network, torch.nn.Module):
                    network.compile()
        self.optimizer_factory = optimizer
        self._means = {stage: TermMeans() for stage in ("train", "val", "test")}
        self.lr_scheduler_config = dict(lr_scheduler) if lr_scheduler else None
        self._saved_at: tuple[int, int] | None = None  # (epoch, step) of the latest checkpoint
        self._settings_at_checkpoint: dict[str, Any] | None = None
        # Models with a prior: active units of the posterior means over each validation epoch.
        # A model written before ``monitor`` existed (``loss(x, y, step)``) gets every step in
        # full, as it always did.
        parameters = inspect.signature(model.loss).parameters
        self._loss_takes_monitor = "monitor" in parameters or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
        )
        counts_units = getattr(model, "has_prior", False) and hasattr(model, "posterior_means")
        self._active_units = ActiveUnits(model.latent_dims) if counts_units else None
        self._collapse = CollapseWatch()
        # No save_hyperparameters: the run's config.yaml holds everything, image shape included,
        # and load_run rebuilds the model from it.

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets the current hook's name around every hook call, dozens of times per
        # step; a plain attribute needs none of nn.Module's parameter/buffer/submodule checks.
        if name in lightning_compat.HOOK_NAME_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _step(
        self, x: torch.Tensor, y: torch.Tensor, stage: str, monitor: bool = True
    ) -> torch.Tensor:
        """The loss (a scalar) of images x (B, C, H, W) with labels y (B,), its terms added to
        ``stage``'s means; ``monitor=False`` (a training step whose terms no point reads) lets
        the model leave out the terms that only describe training."""
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        step = self.global_step if stage == "train" else None
        terms = self._model_terms(x, y, step, monitor)
        self._means[stage].add(terms, x.shape[0], step=step)
        if stage == "val" and self._active_units is not None:
            # One more encoder pass, in validation only; sums stay on the device.
            self._active_units.add(self.model.posterior_means(x, y))
        return terms["loss"]

    def _model_terms(
        self, x: torch.Tensor, y: torch.Tensor, step: int | None, monitor: bool
    ) -> dict[str, torch.Tensor]:
        """``model.loss`` of images x (B, C, H, W) with labels y at ``step``: with ``monitor``
        where the model's loss takes it (every model of ours), else every term."""
        if self._loss_takes_monitor:
            return self.model.loss(x, y=y, step=step, monitor=monitor)
        return self.model.loss(x, y=y, step=step)

    def _logs_this_step(self) -> bool:
        """Whether the trainer writes step metrics after this step (every log_every_n_steps)."""
        return lightning_compat.logs_this_step(self.trainer)

    def _log_means(self, stage: str, sync: bool, epoch_end: bool = False) -> None:
        """Log the means accumulated in ``stage`` since the last call, then start afresh;
        ``epoch_end``: training's remainder at the end of its epoch (an epoch-level point)."""
        means = self._means[stage].pop(self.trainer.strategy if sync else None)
        if stage != "train" and means:
            self._warn_if_nonfinite(stage, means)
        for name, value in means.items():
            self.log(
                f"{stage}/{name}",
                value,
                prog_bar=name == "loss",
                on_step=stage == "train" and not epoch_end,
                on_epoch=stage != "train" or epoch_end,
                # Already summed over processes; syncing the equal values again is a no-op that
                # keeps Lightning from warning about unsynced epoch metrics.
                sync_dist=sync,
            )

    def _warn_if_nonfinite(self, stage: str, means: Mapping[str, torch.Tensor]) -> None:
        """Warns naming the non-finite terms of an evaluation epoch (one sync per epoch)."""
        finite = torch.isfinite(torch.stack(list(means.values()))).tolist()
        bad = {
            name: float(value)
            for (name, value), ok in zip(means.items(), finite, strict=True)
            if not ok
        }
        if not bad or not self.trainer.is_global_zero:
            return
        terms = ", ".join(f"{stage}/{name}={value}" for name, value in bad.items())
        if stage == "test":
            log.warning("non-finite test terms: %s", terms)
            return
        if self.trainer.sanity_checking:
            log.warning("non-finite val terms in the sanity check: %s", terms)
            return
        message = f"non-finite val terms in epoch {self.current_epoch} (step {self.global_step}): "
        message += terms
        checkpoint = self.trainer.checkpoint_callback
        monitor = getattr(checkpoint, "monitor", None) or ""
        value = bad.get(monitor.removeprefix("val/")) if monitor.startswith("val/") else None
        if value is not None:
            # ModelCheckpoint scores nan as the worst value; only an inf "better" than any wins.
            if value == (-math.inf if checkpoint.mode == "min" else math.inf):
                message += (
                    f"; {monitor}={value} counts as the best score, for checkpoints/best.ckpt"
                )
            elif checkpoint.best_model_path:
                message += f"; {monitor}={value} does not replace an earlier checkpoints/best.ckpt"
            else:
                message += f"; with {monitor}={value}, checkpoints/best.ckpt holds this epoch "
                message += "until an epoch with a finite score replaces it"
        log.warning(message)

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The loss of ``batch``: images (B, C, H, W) and labels (B,), or a
        :class:`BatchGroup` of S batches and their labels (S, B) from
        :class:`~vae_experiments.data.ImageDataModule`, one optimizer step each: this method
        takes the first steps itself (:meth:`_own_steps`) and returns the last trained batch's
        loss for Lightning's automatic optimization to step on."""
        if not self.automatic_optimization:
            return self._adversarial_step(batch[0], batch[1], batch_idx)
        images, labels = batch[0], batch[1]
        first_step = self.global_step
        if isinstance(images, BatchGroup):
            images, labels = self._own_steps(images, labels, batch_idx)
            # A logging step anywhere in the group: the point is written at the group's end.
            interval = self.trainer.log_every_n_steps
            logs = (self.global_step + 1) // interval > first_step // interval
        else:
            logs = self._logs_this_step()
        epoch_ends = batch_idx + 1 == self.trainer.num_training_batches
        # Every term on the steps whose point is written (the logging step, the epoch's last);
        # the others only what the objective needs.
        loss = self._step(images, labels, "train", monitor=logs or epoch_ends)
        # Where the host reads the metrics anyway, and before the epoch's checkpoint.
        if logs or epoch_ends:
            self._raise_if_nonfinite()
        if logs:
            self._log_train_point()
        return loss

    def _own_steps(
        self, group: BatchGroup, labels: torch.Tensor, batch_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Takes an optimizer step on each batch of ``group`` (S batches, with ``labels``
        (S, B)) but the last one to train, and returns that batch (B, C, H, W) and its labels
        (B,) for Lightning's step.

        A group stops early at ``trainer.max_steps``, and when a signal asked training to stop
        (SIGTERM, Ctrl-C: the checkpoint is written after the next step, one later than without
        groups), except in an epoch's last group, whose end Lightning must see; the data module
        is told which batches were not trained, and a resumed run trains them first.
        """
        trainer = self.trainer
        own = len(group) - 1
        if trainer.max_steps >= 0:
            own = max(0, min(own, trainer.max_steps - self.global_step - 1))
        may_stop = batch_idx + 1 < trainer.num_training_batches
        for index in range(own):
            self._own_step(group[index], labels[index])
            if may_stop and trainer.received_sigterm:
                own = index + 1
                break
        untrained = len(group) - 1 - own
        if untrained:
            trainer.datamodule.untrained(untrained)
        return group[own], labels[own]

    def _log_train_point(self) -> None:
        """Writes the means of the train terms since the last point to every logger, filed
        under this step as Lightning files ``self.log(..., on_step=True)``, with one host read;
        the progress bar gets ``train/loss`` through ``self.log``. Writing to the loggers
        directly skips Lightning's bookkeeping of each logged value, which cost about as much
        as a small model's step per term logged."""
        means = self._means["train"].pop()
        if not means:
            return
        values = torch.stack(list(means.values())).tolist()
        metrics: dict[str, float] = {
            f"train/{name}": value for name, value in zip(means, values, strict=True)
        }
        if "train/loss" in metrics:
            self.log(
                "train/loss",
                metrics["train/loss"],
                prog_bar=True,
                logger=False,
                on_step=True,
                on_epoch=False,
                batch_size=1,
            )
        if self.trainer.loggers:
            metrics["epoch"] = self.current_epoch  # as Lightning adds to every logged set
            step = self.global_step
            for logger in self.trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def _own_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer step on the batch ``x`` (B, C, H, W) with labels ``y``, in the order Lightning's automatic
        optimization takes it (loss, zero_grad, backward, clipping, step), so the weights come
        out bit for bit the same, but without Lightning's per-step hooks, closure and wrappers:
        their fixed cost is what groups of batches save. The conditions under which batches
        are grouped (:func:`~vae_experiments.training.step_groups.steps_per_group`) leave out
        what would make this step differ from Lightning's (gradient accumulation, a gradient
        scaler, DDP's gradient sync, step-interval lr schedulers, optimizers that need a
        closure)."""
        trainer = self.trainer
        optimizer = trainer.optimizers[0]
        loss = self._step(x, y, "train", monitor=False)
        optimizer.zero_grad()
        if torch.is_autocast_enabled(x.device.type):
            # Lightning runs backward outside its autocast context (bf16-mixed): so do we.
            with torch.autocast(x.device.type, enabled=False):
                loss.backward()
        else:
            loss.backward()
        if trainer.gradient_clip_val:
            self.configure_gradient_clipping(
                optimizer, trainer.gradient_clip_val, trainer.gradient_clip_algorithm
            )
        optimizer.step()
        lightning_compat.count_optimizer_step(trainer)

    def _adversarial_step(self, x: torch.Tensor, y: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """The training step of a model with an adversary, on images x (B, C, H, W) with labels
        y: one ``loss`` call, then the model's optimizer steps on ``loss`` and the adversary's
        on ``adversary_loss``, in that order (Kim & Mnih's algorithm 2). Each zeroes its
        gradients before its backward pass, so gradients that ``loss`` left in the adversary's
        parameters are not used. Returns the model's loss (detached)."""
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        step = self.global_step
        logs = self._logs_this_step()
        epoch_ends = batch_idx + 1 == self.trainer.num_training_batches
        # Every term on the steps whose point is written, as in training_step.
        terms = self._model_terms(x, y, step, monitor=logs or epoch_ends)
        self._means["train"].add(terms, x.shape[0], step=step)
        # Where the host reads the metrics anyway, and before the epoch's checkpoint; before the
        # steps, so that a non-finite loss never reaches the weights.
        if logs or epoch_ends:
            self._raise_if_nonfinite()
        model_optimizer = self.optimizers()[0]  # Lightning's wrapper: its step counts global_step
        adversary_optimizer = self.trainer.optimizers[1]  # plain torch: a step counted once
        for optimizer, loss in (
            (model_optimizer, terms["loss"]),
            (adversary_optimizer, terms[ADVERSARY_LOSS]),
        ):
            optimizer.zero_grad()
            self.manual_backward(loss)  # outside autocast, as Lightning's backward
            optimizer.step()
        if logs:
            self._log_train_point()
        return terms["loss"].detach()

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch[0], batch[1], "val")

    def test_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch[0], batch[1], "test")

    def on_fit_start(self) -> None:
        # In every training process, once it exists: torch's per-step CUDA check without NVML.
        lightning_compat.pause_nvml_cuda_check()

    def on_fit_end(self) -> None:
        lightning_compat.restore_nvml_cuda_check()

    def on_train_epoch_start(self) -> None:
        self._means["train"].reset()

    def on_train_epoch_end(self) -> None:
        # Before ModelCheckpoint's hook: Lightning calls the module's first.
        self._raise_if_nonfinite(weights=True)
        # What the epoch trained since its last train/* point (all of it in an epoch shorter
        # than log_every_n_steps): at least one point per epoch, one host read per epoch.
        self._log_means("train", sync=False, epoch_end=True)

    def on_validation_start(self) -> None:
        # Checkpoints are written at the end of validation. Also called in the sanity check,
        # before any training step (nothing recorded yet; the weights are the initial ones).
        if self.trainer.state.fn == TrainerFn.FITTING and not self.trainer.sanity_checking:
            self._raise_if_nonfinite(weights=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._saved_at = (checkpoint["epoch"], checkpoint["global_step"])
        checkpoint[SETTINGS_KEY] = self._configured_settings()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._settings_at_checkpoint = checkpoint.get(SETTINGS_KEY)

    def on_train_start(self) -> None:
        self._warn_if_warmup_outlasts_run()
        self._unfuse_if_refused()
        # After Lightning restored the optimizer and scheduler: what the config changed since
        # the checkpoint (resume=DIR optimizer.lr=...) takes effect now.
        before, self._settings_at_checkpoint = self._settings_at_checkpoint, None
        if before is None:
            return
        schedulers = [config.scheduler for config in self.trainer.lr_scheduler_configs]
        factory = self.lr_scheduler_config["scheduler"] if self.lr_scheduler_config else None
        # The model's optimizer: an adversary's is the model's config (model.adversary_optimizer).
        applied = apply_changed_settings(
            before, self._configured_settings(), self.trainer.optimizers[:1], schedulers, factory
        )
        if applied:
            log.info("changed since the checkpoint, now in effect: %s", "; ".join(applied))

    def _configured_settings(self) -> dict[str, dict[str, Any]]:
        scheduler = self.lr_scheduler_config["scheduler"] if self.lr_scheduler_config else None
        return configured_settings(self.optimizer_factory, scheduler)

    def _raise_if_nonfinite(self, weights: bool = False) -> None:
        """Raises :class:`NonFiniteLossError` if a training term was not finite at a step so
        far, or (with ``weights``) if a weight is not finite. A sync, and in multi-process
        runs a collective: every process calls it at the same points and raises alike."""
        fault = self._means["train"].first_nonfinite(self.trainer.strategy)
        if fault is not None:
            raise NonFiniteLossError(
                f"non-finite loss at step {fault.step} (epoch {self.current_epoch}, both "
                f"counted from 0): {fault.describe('train/')}. {self._fault_advice()}"
            )
        if not weights:
            return
        # One small kernel per tensor and one sync, once per epoch. DDP keeps the weights of
        # all processes equal, so they all agree.
        parameters = list(self.named_parameters())
        finite = torch.stack([torch.isfinite(p).all() for _, p in parameters]).tolist()
        bad = [name for (name, _), ok in zip(parameters, finite, strict=True) if not ok]
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise NonFiniteLossError(
                f"non-finite weights at step {self.global_step} (epoch {self.current_epoch}, "
                f"both counted from 0), though every loss term was finite: {shown}. "
                f"{self._fault_advice()}"
            )

    def _fault_advice(self) -> str:
        """Which checkpoint is the last good one, and the settings to try."""
        trainer = self.trainer
        # The newest checkpoint: the one of the callback that keeps the latest (no monitor).
        latest = [cb for cb in trainer.checkpoint_callbacks if getattr(cb, "monitor", 0) is None]
        last = latest[0].best_model_path if latest else ""
        if last and self._saved_at is not None:
            epoch, step = self._saved_at
            kept = f"The last good checkpoint is kept: {last} (epoch {epoch}, step {step})."
        elif last:
            kept = f"The last good checkpoint is kept: {last}."
        else:
            kept = "No checkpoint was written yet (the first is written after validation)."
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        tries = ["a lower optimizer.lr" + (f" (now {lr:g})" if lr is not None else "")]
        clip = trainer.gradient_clip_val
        if clip:
            tries.append(f"a lower trainer.gradient_clip_val (now {clip:g})")
        elif self.automatic_optimization:  # a model with an adversary is refused clipping
            tries.append("trainer.gradient_clip_val=1.0 (clips the gradients)")
        precision = str(trainer.precision)
        if precision not in ("32-true", "64-true"):
            tries.append(f"trainer.precision=32-true (now {precision})")
        return f"Training stopped. {kept} To try: {_and(tries)}."

    def on_validation_epoch_start(self) -> None:
        self._means["val"].reset()
        if self._active_units is not None:
            self._active_units.sums = None

    def on_validation_epoch_end(self) -> None:
        self._log_means("val", sync=True)
        self._log_active_units()

    def _steps_per_epoch(self) -> int:
        """Optimizer steps per training epoch (Lightning counts groups of steps as batches)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if getattr(datamodule, "counts_steps_itself", False):
            return int(datamodule.train_batches_per_epoch)
        batches = self.trainer.num_training_batches
        return int(batches) if math.isfinite(batches) else 0

    def _total_steps(self) -> tuple[int, str] | None:
        """The optimizer steps the whole run will take, and how they come about
        (``trainer.max_epochs=30 x 20 steps per epoch``); None when training runs until it is
        stopped."""
        trainer = self.trainer
        per_epoch = self._steps_per_epoch()
        by_epochs = None
        if trainer.max_epochs not in (None, -1) and per_epoch:
            by_epochs = trainer.max_epochs * per_epoch
        if trainer.max_steps not in (None, -1) and (
            by_epochs is None or trainer.max_steps < by_epochs
        ):
            return trainer.max_steps, f"trainer.max_steps={trainer.max_steps}"
        if by_epochs is None:
            return None
        return by_epochs, f"trainer.max_epochs={trainer.max_epochs} x {per_epoch} steps per epoch"

    def _warn_if_warmup_outlasts_run(self) -> None:
        """Warns when the KL warm-up (``model.kl_warmup_steps``) is longer than the whole run:
        the KL weight never reaches ``model.beta``, so the model is never trained on the
        objective that ``elbo`` reports."""
        warmup = getattr(self.model, "kl_warmup_steps", 0) or 0
        total = self._total_steps() if warmup else None
        if total is None or warmup <= total[0] or not self.trainer.is_global_zero:
            return
        steps, how = total
        beta = getattr(self.model, "beta", 1.0)
        log.warning(
            "model.kl_warmup_steps=%d is longer than the whole run, %d steps (%s): the KL weight "
            "rises only to %.2g of model.beta=%g by the last step, so the run never trains on "
            "the objective that elbo reports. Lower model.kl_warmup_steps (e.g. %d: a tenth "
            "of the run) or raise trainer.max_epochs",
            warmup,
            steps,
            how,
            steps / warmup,
            beta,
            max(1, steps // 10),
        )

    def _log_active_units(self) -> None:
        """Logs ``val/active_units`` (Burda et al.'s count over the whole validation split, all
        processes), warns about posterior collapse when no unit has been active for
        :func:`collapse_patience` validations in a row after the KL warm-up (or at the end of
        training), and says when units open up again after that warning. One collective and
        one host sync per validation epoch."""
        units = self._active_units
        if units is None:
            return
        sums = units.sums if units.sums is not None else units.empty_sums(self.device)
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        if int(sums[-1]) < 2:
            return
        active = sum(units.counts(sums))
        # Equal on every process already; sync_dist keeps Lightning from warning about it.
        self.log("val/active_units", float(active), on_epoch=True, sync_dist=True)
        if self.trainer.sanity_checking:
            return
        warmup = getattr(self.model, "kl_warmup_steps", 0) or 0
        self._collapse.patience = collapse_patience(self.trainer.max_epochs)
        event = self._collapse.update(active, self.current_epoch, self.global_step >= warmup)
        if not self.trainer.is_global_zero:
            return
        if event == "collapsed":
            log.warning(self._collapse_message())
        elif event == "recovered":
            log.info(
                "posterior collapse over: val/active_units=%d of %d in epoch %d (step %d)",
                active,
                sum(self.model.latent_dims),
                self.current_epoch,
                self.global_step,
            )

    def on_train_end(self) -> None:
        # A run that ends with no active unit says so, however few validations it had.
        ended_collapsed = self._active_units is not None and self._collapse.at_end()
        if ended_collapsed and self.trainer.is_global_zero:
            log.warning(self._collapse_message())

    def _collapse_message(self) -> str:
        """Says that no latent unit has been active for the last validations, what that means,
        and what to try."""
        model = self.model
        total = sum(model.latent_dims)
        tries = []
        warmup = getattr(model, "kl_warmup_steps", None)
        if warmup is not None:
            steps = 10 * max(1, self._steps_per_epoch())
            now = f"now {warmup}" if warmup else "now off"
            tries.append(f"a KL warm-up (model.kl_warmup_steps={steps}: 10 epochs; {now})")
        beta = getattr(model, "beta", None)
        if beta is not None:
            tries.append(f"a lower model.beta (now {beta:g})")
        tries.append("a smaller decoder, or more epochs (units can open up later)")
        count, since = self._collapse.streak, self._collapse.since
        when = (
            f"in epoch {since}" if count == 1 else f"in the {count} validations since epoch {since}"
        )
        return (
            f"posterior collapse: val/active_units=0 of {total} {when} (step "
            f"{self.global_step}): no latent unit's posterior mean varies across the "
            f"validation images (variance > {ACTIVE_UNIT_THRESHOLD:g}), so the decoder ignores z "
            f"and samples all look alike. To try: {_and(tries)}."
        )

    def on_test_epoch_start(self) -> None:
        self._means["test"].reset()

    def on_test_epoch_end(self) -> None:
        self._log_means("test", sync=True)

    def _fused_allowed(self) -> bool:
        """Whether the optimizer may be torch's fused one: not where Lightning refuses to clip
        gradients of an optimizer that unscales them itself (mixed precision)."""
        trainer = self.trainer
        mixed = str(trainer.precision).endswith("-mixed")
        return not (mixed and trainer.gradient_clip_val)

    def _unfuse_if_refused(self) -> None:
        """A run resumed with clipping under mixed precision from a checkpoint of a fused
        optimizer: the restored param groups say fused, which Lightning refuses to clip; torch's
        other implementations read the same state (the other way round they would not)."""
        if self._fused_allowed():
            return
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                if group.get("fused"):
                    group["fused"] = False

    def configure_optimizers(self) -> Any:
        if not self.automatic_optimization:
            return self._adversarial_optimizers()
        optimizer = build_optimizer(
            self.optimizer_factory, self.parameters(), fused_allowed=self._fused_allowed()
        )
        if self.lr_scheduler_config is None:
            return optimizer
        config = dict(self.lr_scheduler_config)
        config["scheduler"] = config["scheduler"](optimizer)
        return {"optimizer": optimizer, "lr_scheduler": config}

    def _adversarial_optimizers(self) -> list[torch.optim.Optimizer]:
        """The two optimizers of a model with an adversary, the model's first: ``optimizer``
        over the model's own parameters, ``model.adversary_optimizer`` over the adversary's."""
        self.check_processes(self.trainer.world_size)
        if self.lr_scheduler_config is not None:  # config_checks refuses it with the config
            raise ConfigError(
                "scheduler", allowed=f"{type(self.model).__name__} takes no lr schedule"
            )
        own, adversary = split_parameters(self.model)
        fused = self._fused_allowed()
        return [
            build_optimizer(self.optimizer_factory, own, fused_allowed=fused),
            build_optimizer(self.model.adversary_optimizer, adversary, fused_allowed=fused),
        ]

    def check_processes(self, world_size: int) -> None:
        """Refuses training a model with an adversary in several processes (``world_size`` > 1):
        DDP expects one backward pass per forward, and its two would not be synchronised."""
        if world_size > 1 and not self.automatic_optimization:
            raise ConfigError(
                "trainer.devices",
                world_size,
                f"{type(self.model).__name__} has an adversary and trains in one process (DDP "
                "would not synchronise its two backward passes per step): use trainer=cpu or "
                "trainer.devices=1",
            )
