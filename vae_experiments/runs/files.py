"""Reading and writing a run's files: atomically, so that a crash or kill never leaves a
half-written one (see :mod:`vae_experiments.runs.layout` for what each file is).

Plain Python and OmegaConf: no torch, Lightning or Hydra.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import yaml
from omegaconf import DictConfig, OmegaConf

from vae_experiments.runs.layout import (
    CONFIG_FILE,
    EVENT_FILE_GLOB,
    HYDRA_CHOICES_FILE,
    HYDRA_CONFIG_FILE,
    HYDRA_OVERRIDES_FILE,
    METRICS_FILE,
    STATUS_FILE,
)

#: OS error codes that mean the file's filesystem, or the user's quota on it, is full.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFullError(OSError):
    """A file could not be written because its filesystem (or the user's quota) is full.

    ``str()`` is one line for the user, naming the file and the free space; the file that was
    being replaced is left as it was. Build it with :func:`disk_full_error`.
    """

    def __str__(self) -> str:
        return str(self.strerror)


def _size(num_bytes: int) -> str:
    """``1536`` -> ``1.5 KiB``."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = 0
    while power < len(units) - 1 and num_bytes >= 1024 ** (power + 1):
        power += 1
    return f"{num_bytes / 1024**power:.1f} {units[power]}"


def _disk_full_cause(error: BaseException) -> OSError | None:
    """The ENOSPC or EDQUOT OSError behind ``error``, following what it was raised from or while
    handling (writers wrap it: ``torch.save`` into a file raises a RuntimeError, "unexpected
    pos", while handling the OSError); None if there is none."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS:
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def disk_full_error(path: str | Path, error: BaseException) -> DiskFullError | None:
    """The :class:`DiskFullError` for a failed write of ``path`` when ``error`` comes from a full
    filesystem or quota (ENOSPC, EDQUOT; see :func:`_disk_full_cause`), else None."""
    cause = _disk_full_cause(error)
    if cause is None or isinstance(cause, DiskFullError):
        return cause
    path = Path(path)
    folder = next((p for p in [path.parent, *path.parents] if p.exists()), Path("."))
    try:
        usage = shutil.disk_usage(folder)
        space = f"{_size(usage.free)} free of {_size(usage.total)} on its filesystem"
    except OSError:
        space = "free space unknown"
    if cause.errno == errno.EDQUOT:
        what, space = "disk quota exceeded", f"{space}, but your quota is full (`quota -s`)"
    else:
        what = "no space left on device"
    message = (
        f"{what} writing {path}: {space}. The file it replaces, if any, is intact. Free some "
        "space, or write to another disk (a training run: hydra.run.dir=<a folder there>)"
    )
    return DiskFullError(cause.errno, message, str(path))


@contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Opens a file whose content replaces ``path`` only when the block completes, so that a
    crash or kill mid-write leaves the previous file intact.

    The data goes to a temporary file in the same directory (a rename across filesystems would
    be a copy), is flushed and fsynced, then replaces the target with ``os.replace`` (atomic on
    POSIX and Windows); the directory is fsynced too, so the rename survives a power loss.

    Raises:
        DiskFullError: The filesystem or the user's quota is full (ENOSPC, EDQUOT, also when
            the writer wraps the OS error): one line naming ``path`` and the free space. The
            temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        full = disk_full_error(path, error)
        if full is not None and full is not error:
            raise full from None  # the one line says it all; the OS error chain would not
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


def after_earlier_event_files(directory: str | Path) -> None:
    """Waits, a second at most, until the clock is past the second in which the newest event
    file in ``directory`` was made, so that the next one sorts after every earlier one.

    TensorBoard reads a run's event files in the order of their names
    (``events.out.tfevents.<second>.<host>.<pid>.<n>``) and of two points at one step keeps the
    one read last. Two writers within one second sort by host and process id: the later one
    (an evaluation written at the step training ended, after another) could lose. Concurrent
    writers are not ordered by this.
    """
    seconds = []
    for path in Path(directory).glob(EVENT_FILE_GLOB):
        field = path.name.split(".")[3]
        if field.isdigit():
            seconds.append(int(field))
    wait = max(seconds, default=0) + 1 - time.time()
    if 0 < wait <= 2:  # more: the other file's clock is ahead of ours, waiting would not help
        time.sleep(wait)


def write_status(run_dir: str | Path, status: str, **details: Any) -> None:
    """Records how the run stands in ``status.json`` (atomically), with a UTC timestamp.

    Args:
        run_dir: the run directory.
        status: one of the status words of :mod:`~vae_experiments.runs.layout`.
        **details: JSON-serialisable extras, e.g. ``error=...`` or ``resume_from=...``.
    """
    record = {"status": status, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(Path(run_dir) / STATUS_FILE, {**record, **details})


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's ``status.json`` as a dict; None when it has none.

    Raises:
        ValueError: the file is not a JSON object.
    """
    path = Path(run_dir) / STATUS_FILE
    if not path.is_file():
        return None
    status = json.loads(path.read_text())
    if not isinstance(status, dict):
        raise ValueError(f"{path} holds no JSON object")
    return status


def read_metrics(run_dir: str | Path) -> dict[str, float]:
    """The run's ``metrics.json`` as a dict."""
    return json.loads((Path(run_dir) / METRICS_FILE).read_text())


def load_config(run_dir: str | Path) -> DictConfig:
    """The run's ``config.yaml`` (interpolations kept; they resolve without Hydra), or Hydra's
    copy of the composed config for a run that stopped before writing its own."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        path = Path(run_dir) / HYDRA_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{Path(run_dir) / CONFIG_FILE} not found: {run_dir} is not a run directory"
        )
    config = OmegaConf.load(path)
    if not isinstance(config, DictConfig):
        raise ValueError(f"{path} is not a config mapping")
    return config


def save_config(run_dir: str | Path, config: DictConfig) -> None:
    """Writes the run's ``config.yaml`` atomically, without Hydra's own ``hydra`` node.

    A config that replaces a different one (a resume that changed values) keeps the earlier one
    beside it as ``config.before-resume-<n>.yaml``, so the run's history stays readable; the
    same config again writes nothing.

    Args:
        run_dir: the run directory.
        config: the composed config, ``model.image_shape`` filled in.
    """
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    container = OmegaConf.to_container(config, resolve=False)
    container.pop("hydra", None)
    text = OmegaConf.to_yaml(container)
    if path.is_file():
        if path.read_text() == text:
            return
        number = len(list(run_dir.glob("config.before-resume-*.yaml"))) + 1
        shutil.copy2(path, run_dir / f"config.before-resume-{number}.yaml")
    with atomic_write(path) as f:
        f.write(text)


def read_group_choices(run_dir: str | Path) -> dict[str, str]:
    """The config-group choices a run was composed with (``{"model": "vae", "model/network":
    "mlp", "data": "digits", ...}``), from Hydra's ``.hydra/hydra.yaml``; Hydra's own groups
    (``hydra/...``) and empty choices are left out. Empty when Hydra wrote no such file (a run
    trained with ``train()`` in Python) or it cannot be read.

    Read as plain YAML (``yaml.safe_load``): a run directory from someone else builds nothing.
    """
    path = Path(run_dir) / HYDRA_CHOICES_FILE
    try:
        choices = yaml.safe_load(path.read_text())["hydra"]["runtime"]["choices"]
    except Exception:  # missing, half-written or not Hydra's: no choices known
        return {}
    if not isinstance(choices, dict):
        return {}
    return {
        str(group): str(choice)
        for group, choice in choices.items()
        if not str(group).startswith("hydra/") and choice is not None
    }


def read_command_overrides(run_dir: str | Path) -> list[str]:
    """The overrides a run was started with, as typed (``["model=vae", "model.beta=4"]``), from
    Hydra's ``.hydra/overrides.yaml``; empty when Hydra wrote no such file (a run trained with
    ``train()`` in Python) or it cannot be read. A resume keeps the first command's file.

    Read as plain YAML (``yaml.safe_load``), as :func:`read_group_choices`.
    """
    path = Path(run_dir) / HYDRA_OVERRIDES_FILE
    try:
        items = yaml.safe_load(path.read_text())
    except Exception:  # missing, half-written or not Hydra's: no command line known
        return []
    return [str(item) for item in items] if isinstance(items, list) else []
