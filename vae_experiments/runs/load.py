"""Loading a trained run back: its model with the checkpoint's weights, and its data.

``load_run`` is "build the model config, load the state dict": the run's ``config.yaml`` holds
the data's image shape, and building goes through :mod:`vae_experiments.targets`, which only
builds classes we ship, so a run directory from someone else cannot run code. Checkpoints load
with ``weights_only=True`` for the same reason. Plain torch and OmegaConf: no Lightning or
Hydra, so it works in a notebook::

    from vae_experiments.runs import iterate_split, load_data, load_run

    model, cfg = load_run("outputs/2026-11-25/14-03-12")
    data = load_data(cfg)
    for x, labels in iterate_split(data, "test"):
        print(model.loss(x, labels)["loss"])  # labels: used by a model that needs them (CVAE)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from vae_experiments.data import ImageData
from vae_experiments.models import LatentModel
from vae_experiments.runs.files import load_config
from vae_experiments.runs.layout import (
    BEST,
    CONFIG_FILE,
    HPC_CHECKPOINT_GLOB,
    LAST,
    checkpoint_path,
    find_checkpoint,
    run_dir_of,
)
from vae_experiments.targets import instantiate, resolve_target


def build_model(cfg: DictConfig) -> LatentModel:
    """The untrained model of a run's config (``model.image_shape`` must be set)."""
    if cfg.model.get("image_shape") is None:
        resolve_target(cfg.model.get("_target_"), "model")  # a foreign target is named first
        raise ValueError(
            f"the run's {CONFIG_FILE} has no model.image_shape: it was written by an older "
            "version of vae-experiments; train the run again"
        )
    return instantiate(cfg.model, key="model")


def model_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's state dict inside a Lightning checkpoint (keys without ``model.``)."""
    return {
        key.removeprefix("model."): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith("model.")
    }


def load_run(
    run: str | Path, checkpoint: str = BEST, map_location: str | torch.device = "cpu"
) -> tuple[LatentModel, DictConfig]:
    """Loads a trained model and its config from a run directory or a checkpoint file.

    Args:
        run: a run directory or a ``.ckpt`` file inside one.
        checkpoint: ``best`` (lowest validation loss) or ``last``; ignored for a ``.ckpt`` path.
        map_location: device to load the weights to.

    Returns:
        The model in eval mode and the run's config (``config.yaml``).

    Raises:
        FileNotFoundError: ``run`` is no run directory or has no such checkpoint.
        vae_experiments.targets.ConfigError: the config names something we do not build.
    """
    run_dir = run_dir_of(run)
    ckpt_path = find_checkpoint(run, checkpoint)
    cfg = load_config(run_dir)
    model = build_model(cfg)
    state = torch.load(ckpt_path, map_location=map_location, weights_only=True)
    model.load_state_dict(model_state(state))
    return model.to(map_location).eval(), cfg


def load_data(cfg: DictConfig, **overrides: Any) -> ImageData:
    """Builds the data of a run's config and loads its splits.

    Args:
        cfg: a run's config (``cfg.data`` is used).
        **overrides: constructor arguments of ``cfg.data`` to replace, e.g. ``batch_size=1000``.
    """
    data = instantiate(cfg.data, key="data", **overrides)
    data.prepare()  # a cache to build, or a download the config asks for
    data.setup()
    return data


class UnreadableCheckpointError(ValueError):
    """A checkpoint file that torch cannot load (truncated by a full disk or a killed copy,
    or not a checkpoint); the message names the file and what to do instead."""


def _position(path: Path) -> tuple[int, int]:
    """(global step, epoch) of a checkpoint; raises whatever torch raises for a bad file."""
    # mmap: only the small entries are read, not every tensor of a large model.
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(state.get("global_step", 0)), int(state.get("epoch", 0))


def readable_checkpoints(run_dir: str | Path) -> list[tuple[Path, int, int]]:
    """The run's checkpoints that load (last.ckpt, best.ckpt and Lightning's SLURM
    ``hpc_ckpt_<n>.ckpt``), as (path, global step, epoch), the furthest trained first."""
    run_dir = Path(run_dir)
    candidates = [
        checkpoint_path(run_dir, LAST),
        checkpoint_path(run_dir, BEST),
        *run_dir.glob(HPC_CHECKPOINT_GLOB),
    ]
    readable = []
    for path in candidates:
        if not path.is_file():
            continue
        try:
            readable.append((path, *_position(path)))
        except Exception:
            continue
    return sorted(readable, key=lambda entry: -entry[1])


def check_checkpoint(path: str | Path, key: str = "resume") -> tuple[int, int]:
    """Loads ``path`` as a checkpoint (cheaply, memory-mapped) before a resume touches anything.

    Returns:
        (global step, epoch) of the checkpoint.

    Raises:
        UnreadableCheckpointError: naming the file, torch's reason, and the newest checkpoint
            of the same run that does load (to pass as ``<key>=``), if there is one.
    """
    path = Path(path)
    try:
        return _position(path)
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        run_dir = run_dir_of(path) if path.suffix == ".ckpt" else path
        others = [entry for entry in readable_checkpoints(run_dir) if entry[0] != path]
        if others:
            other, step, epoch = others[0]
            advice = (
                f"the newest readable checkpoint is {other} (step {step}, epoch {epoch}): "
                f"continue from it with {key}={other}"
            )
        else:
            advice = "no other checkpoint of this run can be read: start the run again"
        raise UnreadableCheckpointError(
            f"{path} cannot be read ({reason}; truncated by a full disk or a killed copy?); "
            f"nothing was changed. {advice}"
        ) from None
