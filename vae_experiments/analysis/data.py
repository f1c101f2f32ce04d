"""A run's data outside the trainer: the set-up :class:`~vae_experiments.data.ImageData` of its
config. Batches of a split come from :func:`~vae_experiments.data.iterate_split`."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from vae_experiments import targets
from vae_experiments.data import ImageData, iterate_split, load_split

__all__ = ["iterate_split", "load_datamodule", "load_split"]


def load_datamodule(cfg: DictConfig, **overrides: Any) -> ImageData:
    """Builds and sets up the data of a run's config (e.g. from ``load_run``).

    Args:
        cfg: a composed training config (``cfg.data`` is used, interpolations resolved).
        **overrides: ``ImageData`` arguments to replace, e.g. ``batch_size=1000``.
    """
    node = OmegaConf.to_container(cfg.data, resolve=True)
    node.update(overrides)
    data = targets.instantiate(node, key="data")
    data.setup()
    return data
