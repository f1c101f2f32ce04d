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
    """Lightning's local checkpoint IO with :func:`save_atomic` for every save, and loads that
    never unpickle code.

    Lightning's own atomic save stages the bytes elsewhere and has regressed between releases;
    this one depends only on ``os.replace``. A checkpoint to resume from may come from someone
    else, so it always loads with ``weights_only=True`` (ours hold only tensors and plain data).
    """

    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        map_location: Any = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        save_atomic(checkpoint, path)
