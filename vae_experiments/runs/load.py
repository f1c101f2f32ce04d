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
        print(model.loss(x)["loss"])
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

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
from vae_experiments.targets import format_value, instantiate, resolve_target


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
        try:
            run_dir = run_dir_of(path) if path.suffix == ".ckpt" else path
            others = [entry for entry in readable_checkpoints(run_dir) if entry[0] != path]
        except FileNotFoundError:  # a checkpoint file on its own: no other to offer
            others = []
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


class CheckpointModelError(ValueError):
    """A checkpoint whose model is not the one a run builds (another class, network, latent
    size or image shape): its weights cannot be loaded. The message names the difference."""


#: What of a model's config decides its parameters' names and shapes, with the words that name it.
ARCHITECTURE = (
    ("model class", "_target_"),
    ("network", "network"),
    ("upper network", "upper_network"),
    ("latent size", "latent_dim"),
    ("latent sizes", "latent_dims"),
    ("likelihood", "likelihood"),
    ("image shape", "image_shape"),
)

#: Most parameter names a message lists, for a checkpoint without a config beside it.
MAX_LISTED_KEYS = 3


def check_checkpoint_model(path: str | Path, cfg: DictConfig, key: str = "ckpt_path") -> None:
    """Raises :class:`CheckpointModelError` when checkpoint ``path`` holds the weights of another
    model than the one ``cfg`` (a composed ``train.yaml`` config, likelihood chosen) builds:
    before anything of a run is built, as the model's parameter names and shapes, built on the
    meta device (no memory, no initialisation), differ from the checkpoint's.

    The message names what differs in the models' configs (model class, network, latent size,
    likelihood, image shape) when the checkpoint's run directory has its ``config.yaml``, and a
    few of the differing parameters when the checkpoint stands alone.

    Raises:
        CheckpointModelError: naming ``key``, the file and the difference.
    """
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise CheckpointModelError(
            f"{key}={path} is not a checkpoint of a training run (it has no state_dict): pass "
            "a .ckpt file from a run's checkpoints/ folder"
        )
    theirs = {name: tuple(value.shape) for name, value in model_state(state).items()}
    cfg = copy.deepcopy(cfg)
    image_shape = instantiate(cfg.data, key="data").image_shape  # from its config: reads nothing
    with open_dict(cfg):
        cfg.model.image_shape = [int(size) for size in image_shape]
    with torch.device("meta"):
        ours = {name: tuple(value.shape) for name, value in build_model(cfg).state_dict().items()}
    if ours == theirs:
        return
    try:
        saved = load_config(run_dir_of(path)).get("model")
    except (FileNotFoundError, ValueError):
        saved = None
    differences = _config_differences(saved, cfg.model) if saved is not None else []
    if differences:
        raise CheckpointModelError(
            f"{key}={path} holds another model than this run's: {'; '.join(differences)}"
        )
    raise CheckpointModelError(
        f"{key}={path} holds the weights of another model than this run's "
        f"({_state_differences(theirs, ours)})"
    )


def _plain(value: Any) -> Any:
    return (
        OmegaConf.to_container(value, resolve=True)
        if isinstance(value, DictConfig | ListConfig)
        else value
    )


def _class_name(node: Any) -> str:
    target = node.get("_target_") if isinstance(node, dict) else node
    return str(target).rpartition(".")[2]


def _config_differences(saved: DictConfig, model: DictConfig) -> list[str]:
    """What of :data:`ARCHITECTURE` differs between a checkpoint's model config (``saved``) and
    this run's, in words: ``model class: VAE here, Autoencoder in the checkpoint``."""
    differences = []
    for label, name in ARCHITECTURE:
        theirs, ours = _plain(saved.get(name)), _plain(model.get(name))
        if theirs == ours:
            continue
        if name == "_target_":
            differences.append(
                f"{label}: {_class_name(ours)} here, {_class_name(theirs)} in the checkpoint"
            )
        elif isinstance(theirs, dict) and isinstance(ours, dict):
            if theirs.get("_target_") != ours.get("_target_"):
                differences.append(
                    f"{label}: {_class_name(ours)} here, {_class_name(theirs)} in the checkpoint"
                )
            elif name != "likelihood":  # a likelihood's settings: its class decides
                differences += [
                    f"model.{name}.{leaf}: {format_value(ours.get(leaf))} here, "
                    f"{format_value(theirs.get(leaf))} in the checkpoint"
                    for leaf in sorted(set(theirs) | set(ours))
                    if theirs.get(leaf) != ours.get(leaf)
                ]
        else:
            differences.append(
                f"{label}: {format_value(ours)} here, {format_value(theirs)} in the checkpoint"
            )
    return differences


def _state_differences(theirs: dict[str, tuple], ours: dict[str, tuple]) -> str:
    """A few parameters that differ, with their shapes: ``not in the checkpoint: encoder.mu.weight
    [4, 32]; shape: decoder.net.0.weight [64, 4] here, [64, 16] in the checkpoint (+5 more)``."""
    missing = [f"{name} {list(ours[name])}" for name in ours if name not in theirs]
    extra = [f"{name} {list(theirs[name])}" for name in theirs if name not in ours]
    shapes = [
        f"{name} {list(ours[name])} here, {list(theirs[name])} in the checkpoint"
        for name in ours
        if name in theirs and ours[name] != theirs[name]
    ]
    listed, count = [], 0
    for words, names in (
        ("not in the checkpoint", missing),
        ("only in the checkpoint", extra),
        ("shape", shapes),
    ):
        shown = names[: max(0, MAX_LISTED_KEYS - count)]
        count += len(shown)
        if shown:
            listed.append(f"{words}: {', '.join(shown)}")
    more = len(missing) + len(extra) + len(shapes) - count
    return "; ".join(listed) + (f" (+{more} more)" if more else "")
