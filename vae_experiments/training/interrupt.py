"""Stopping on a signal with a checkpoint, and resuming exactly where training stopped.

A cluster's time limit (SIGTERM, or SLURM's ``--signal=USR1``) and Ctrl-C (SIGINT) stop training
after the current step; a checkpoint of that moment is written before the process exits. With
the data module's position in the epoch (``ImageDataModule.state_dict``) and the random number
generators' states saved here, a resumed run trains on the same batches with the same noise as
a run that was never stopped.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

from vae_experiments.training import lightning_compat

log = logging.getLogger(__name__)

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")


class RunInterrupted(Exception):
    """Training (or the test after it) stopped on a signal.

    Attributes:
        signal_name: ``"SIGTERM"``, ``"SIGINT"`` or ``"SIGUSR1"``.
        checkpoint: the checkpoint written for this stop, if any.
        step, epoch: where training stood.
        phase: ``"training"``, or ``"testing"`` when training had finished and the final test
            was stopped (its checkpoints are as training left them; no checkpoint is written).
    """

    def __init__(
        self,
        signal_name: str,
        checkpoint: Path | None,
        step: int,
        epoch: int,
        phase: str = "training",
    ) -> None:
        self.signal_name = signal_name
        self.checkpoint = checkpoint
        self.step = step
        self.epoch = epoch
        self.phase = phase
        if phase == "testing":
            message = (
                f"stopped by {signal_name} during the test, after training finished at step "
                f"{step} (epoch {epoch}); the checkpoints are as training left them"
            )
        else:
            saved = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint saved"
            message = f"stopped by {signal_name} at step {step} (epoch {epoch}); {saved}"
        super().__init__(message)

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, the shell's convention for a process ended by a signal."""
        return 128 + int(getattr(signal, self.signal_name, signal.SIGTERM))


def rng_states() -> dict[str, Any]:
    """The states of torch's (CPU and CUDA), numpy's and Python's global generators, as
    tensors, ints and lists only (checkpoints load with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": [version, list(internal), gauss_next],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restores what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


class Interruption(pl.Callback):
    """Saves a checkpoint when a stop signal ends training, and carries RNG states in every
    checkpoint so that a resumed run continues with the same random numbers.

    Use :meth:`catching_signals` around ``trainer.fit``. The first SIGINT, SIGTERM or SIGUSR1
    asks Lightning to stop after the current step (on every process of a DDP run, through
    Lightning's own SIGTERM flag); this callback then writes ``checkpoint_path``. A second
    Ctrl-C stops at once, without a checkpoint.

    Args:
        checkpoint_path: where the interruption's checkpoint goes (``checkpoints/last.ckpt``, so
            that it is what a resume reads).
    """

    def __init__(self, checkpoint_path: str | Path) -> None:
        super().__init__()
        self.checkpoint_path = Path(checkpoint_path)
        self.received: str | None = None
        self.saved: Path | None = None
        self._trainer: pl.Trainer | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        self._rng_at_validation_start: dict[str, Any] | None = None

    @contextmanager
    def catching_signals(self, trainer: pl.Trainer) -> Iterator[None]:
        """Handles the stop signals while inside (only in the main thread, where Python can)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._trainer = trainer
        names = [name for name in STOP_SIGNALS if hasattr(signal, name)]
        if lightning_compat.lightning_answers_sigusr1(trainer):
            # Under SLURM, Lightning answers SIGUSR1 itself: it saves hpc_ckpt_<n>.ckpt and
            # requeues the job, which resumes from that checkpoint.
            names.remove("SIGUSR1")
        previous = {name: signal.signal(getattr(signal, name), self._on_signal) for name in names}
        try:
            yield
        finally:
            for name, handler in previous.items():
                signal.signal(getattr(signal, name), handler)
            self._trainer = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        trainer = self._trainer
        if self.received is None:
            testing = trainer is not None and trainer.testing
            log.warning(
                "%s received: %s%s",
                name,
                "stopping the test after this batch (training has finished; its checkpoints "
                "stay as they are)"
                if testing
                else f"stopping after this batch and saving a checkpoint to {self.checkpoint_path}",
                " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "",
            )
        self.received = self.received or name
        if trainer is None:
            return
        # Lightning checks this flag after every training, validation and test batch (and shares
        # it between DDP processes) and raises SIGTERMException, whichever signal set it. A
        # validation pass is not waited for: on a cluster the grace period before SIGKILL can
        # be shorter than a pass; the checkpoint makes the resumed run validate from its start.
        lightning_compat.request_stop(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            # Validation draws random numbers (a VAE's noise); a run stopped inside it resumes
            # by validating again from the first batch, with the numbers it started with.
            self._rng_at_validation_start = rng_states()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rng_at_validation_start = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        self.received = self.received or "SIGTERM"
        if trainer.testing:
            # The model holds the weights loaded for testing (best.ckpt): saving them as
            # last.ckpt would replace where training stopped.
            log.warning("the test was stopped; the checkpoints are as training left them")
            return
        if trainer.sanity_checking or trainer.global_step == 0:
            log.warning("stopped before training began: no checkpoint to save")
            return
        if not all(torch.isfinite(p).all() for p in pl_module.parameters()):
            log.error("the weights are not finite: keeping the last checkpoint as it is")
            return
        # dump + strategy.save rather than trainer.save_checkpoint, whose barrier could wait
        # forever for DDP processes that stop at another point; global rank 0 writes the file.
        checkpoint = lightning_compat.dump_checkpoint(trainer)
        if trainer.validating:
            lightning_compat.restart_validation_from_start(checkpoint)
        trainer.strategy.save_checkpoint(checkpoint, self.checkpoint_path)
        self.saved = self.checkpoint_path
        log.warning(
            "saved a checkpoint at step %d (epoch %d%s) to %s",
            trainer.global_step,
            trainer.current_epoch,
            ", before its validation" if trainer.validating else "",
            self.checkpoint_path,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng_at_validation_start or rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_to_restore = state_dict.get("rng")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Restored here rather than on load: the sanity check between the two draws numbers.
        # (on_train_epoch_start is not called again when a run resumes mid-epoch.)
        if self._rng_to_restore is not None:
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resumed run whose training had finished goes straight to the test (no
        # on_train_start): it tests with the numbers a run that never stopped would have.
        self.on_train_start(trainer, pl_module)
