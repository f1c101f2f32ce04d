"""The run directory: where a run's files live, how they are written, and how to load a run back.

A run directory (``outputs/<date>/<time>/`` or ``multirun/<date>/<time>/<job>/``) holds::

    .hydra/config.yaml        the composed config (written by Hydra)
    checkpoints/best.ckpt     lowest validation loss
    checkpoints/last.ckpt     end of the last epoch
    metrics.json              test-split metrics at the end of training, plus epochs/steps/time
    status.json               how the run ended: running, finished, failed (with the error) or
                              interrupted (with the checkpoint to resume from)
    tensorboard/              TensorBoard events (logger=tensorboard)
    images/                   the latest reconstruction and sample grids as PNG

Plain PyTorch and OmegaConf only, so it works in a notebook.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import torch
from omegaconf import DictConfig, OmegaConf

from vae_experiments.models import LatentModel
from vae_experiments.targets import instantiate

CONFIG_FILE = Path(".hydra") / "config.yaml"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.json"
STATUS_FILE = "status.json"


@contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Opens a file whose content replaces ``path`` only when the block completes, so that a
    crash or kill mid-write leaves the previous file intact.

    The data goes to a temporary file in the same directory (a rename across filesystems would
    be a copy), is flushed and fsynced, then replaces the target with ``os.replace`` (atomic on
    POSIX and Windows); the directory is fsynced too, so the rename survives a power loss.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX; Windows cannot open a directory
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Writes ``obj`` as JSON with :func:`atomic_write`."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def is_first_process() -> bool:
    """False in the extra processes of a distributed run: they share the first one's run
    directory and must not write its files."""
    ranks = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return all(int(os.environ.get(name, 0)) == 0 for name in ranks)


def write_status(run_dir: str | Path, status: str, **details: Any) -> None:
    """Records how the run stands in ``status.json`` (atomically), with a UTC timestamp.

    Args:
        run_dir: the run directory.
        status: ``running``, ``finished``, ``failed`` or ``interrupted``.
        **details: JSON-serialisable extras, e.g. ``error=...`` or ``resume_from=...``.
    """
    record = {"status": status, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(Path(run_dir) / STATUS_FILE, {**record, **details})


def read_metrics(run_dir: str | Path) -> dict[str, float]:
    """The run's ``metrics.json`` as a dict."""
    return json.loads((Path(run_dir) / METRICS_FILE).read_text())


def call_target(node: Mapping, **kwargs: Any) -> Any:
    """Calls the ``_target_`` of a config node with its other keys (plus ``kwargs``).

    A minimal stand-in for ``hydra.utils.instantiate`` for flat configs, so that loading a run
    needs no Hydra.
    """
    params = (
        OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    )
    module_name, _, attr = params.pop("_target_").rpartition(".")
    target = getattr(importlib.import_module(module_name), attr)
    return target(**params, **kwargs)


def find_checkpoint(run_dir: Path, which: str = "best") -> Path:
    """``checkpoints/best.ckpt`` (or ``last.ckpt``), falling back to the other if missing."""
    ckpt_dir = run_dir / CHECKPOINT_DIR
    order = ["best", "last"] if which == "best" else ["last", "best"]
    for name in order:
        path = ckpt_dir / f"{name}.ckpt"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"no checkpoint in {ckpt_dir} (looked for best.ckpt and last.ckpt); is {run_dir} a run "
        "directory of a run that finished at least one epoch?"
    )


def load_run(
    run: str | Path, checkpoint: str = "best", map_location: str | torch.device = "cpu"
) -> tuple[LatentModel, DictConfig]:
    """Loads a trained model and its config from a run directory or a checkpoint file.

    Args:
        run: a run directory (holding ``.hydra/config.yaml`` and ``checkpoints/``) or a ``.ckpt``
            file inside one.
        checkpoint: ``best`` (lowest validation loss) or ``last``; ignored for a ``.ckpt`` path.
        map_location: device to load the weights to.

    Returns:
        The model in eval mode and the run's composed config.
    """
    run = Path(run)
    run_dir = run.parent.parent if run.suffix == ".ckpt" else run
    config_path = run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: {run_dir} is not a run directory")
    ckpt_path = run if run.suffix == ".ckpt" else find_checkpoint(run_dir, checkpoint)
    cfg = OmegaConf.load(config_path)
    ckpt = torch.load(ckpt_path, map_location=map_location, weights_only=True)
    image_shape = ckpt["hyper_parameters"]["image_shape"]
    model = instantiate(cfg.model, key="model", image_shape=image_shape)
    state = {
        key.removeprefix("model."): value
        for key, value in ckpt["state_dict"].items()
        if key.startswith("model.")
    }
    model.load_state_dict(state)
    return model.to(map_location).eval(), cfg
