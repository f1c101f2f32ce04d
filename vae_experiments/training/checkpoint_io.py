"""Checkpoint files written so that a crash or kill mid-write never damages the previous one."""

from __future__ import annotations

import os
from typing import Any

import torch
from pytorch_lightning.plugins import TorchCheckpointIO

from vae_experiments.runs import atomic_write


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` through :func:`vae_experiments.runs.atomic_write`: readers see the old
    file or the complete new one, never a partial one."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's local checkpoint IO with :func:`save_atomic` for every save.

    Lightning's own atomic save stages the bytes elsewhere and has regressed between releases;
    this one depends only on ``os.replace``.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        save_atomic(checkpoint, path)
