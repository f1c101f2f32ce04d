"""Shared by the analysis commands about one trained run: where their outputs go (a Hydra
resolver), the record of each call, and which device they use.

Each call of ``python scripts/<command>.py run=<run dir or checkpoint>`` writes into a folder of
its own, ``<run dir>/analysis/<command>-<checkpoint>-<settings>/`` (e.g.
``analysis/sample-last-gmm-c20/``, ``analysis/evaluate-best-test-k5000/``), created by
:func:`analysis_dir` and never one that exists (a repeat gets ``_1``, ``_2``, ...), so no call
overwrites what an earlier one wrote. Hydra's log goes there too, through the ``analysis_dir``
resolver in the command's config, so that no ``outputs/`` folder appears and the run's
``.hydra/`` is never overwritten::

    hydra:
      run:   # oc.select: a missing run= gets our message
        dir: ${analysis_dir:${oc.select:run,null},sample,${checkpoint},${density},c${components}}
      output_subdir: null

The resolver is cached, so the folder is claimed once per call however often Hydra reads
``hydra.run.dir``. Call :func:`register_resolvers` at import time of the module defining the
``@hydra.main`` function (before Hydra composes the config).

A call's mistake (a bad setting, a run that cannot be analysed) is a :class:`UsageError`,
raised before anything is written: the command says it in one ``error:`` line with exit status
2, and :func:`discard_unused` removes the folder Hydra made for the call (and ``analysis/``
where the call created it).
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vae_experiments.cli.run_dirs import UNSAFE_NAME_CHARS as _UNSAFE
from vae_experiments.cli.run_dirs import claim_fresh_dir_and_parents, config_error_exit
from vae_experiments.data.errors import DataError
from vae_experiments.runs import ANALYSIS_DIR, atomic_write, run_dir_of
from vae_experiments.runs.load import UnreadableCheckpointError

#: Errors in what an analysis command reads rather than in its command line: a checkpoint that
#: was not loaded (cut short, or not ours), data that cannot be read. Each is one ``error:``
#: line (exit status 2, as a config mistake of train.py) and leaves no folder of the call.
BAD_INPUT_ERRORS = (UnreadableCheckpointError, DataError)

# Folders claimed by analysis_dir in this process -> the parents that claiming them created
# (``analysis/`` on a run's first analysis): discard_unused removes those too.
_CREATED_PARENTS: dict[Path, list[Path]] = {}


class UsageError(ValueError):
    """A bad setting of an analysis command, or a run it cannot analyse: reported as one
    ``error:`` line, exit status 2, without a traceback."""


def analysis_dir(
    run: str | Path | None, command: str, checkpoint: str | None = None, *settings: object
) -> str:
    """Claims a new folder for one call of an analysis command (also an OmegaConf resolver):
    ``<run dir>/analysis/<command>-<checkpoint>-<settings joined by ->``.

    Args:
        run: a run directory or a checkpoint file in one (the command's ``run=``).
        command: the command's name (``sample``, ``evaluate``), first in the folder's name.
        checkpoint: ``best`` or ``last``; when ``run`` is a ``.ckpt`` file, its name is used
            instead (that is the checkpoint the command loads). None leaves it out.
        settings: further values that name the call (``gmm``, ``c20``).

    Returns:
        The folder, created here (atomically): if the name is taken, ``<name>_1``, ``_2``, ...

    A bad ``run=`` exits with a one-line message (exit status 2) before anything is created
    (OmegaConf would wrap an exception into a long traceback; SystemExit passes through as it
    is).
    """
    try:
        run_dir = run_dir_of(run)
    except (ValueError, FileNotFoundError) as exc:
        config_error_exit(str(exc))
    parts = [command]
    if checkpoint is not None:
        parts.append(Path(str(run)).stem if str(run).endswith(".ckpt") else checkpoint)
    name = "-".join(_UNSAFE.sub("_", str(part)) for part in [*parts, *settings])
    folder, created = claim_fresh_dir_and_parents(str(run_dir / ANALYSIS_DIR / name))
    _CREATED_PARENTS[Path(folder).absolute()] = created[:-1]
    return folder


def save_call(out_dir: str | Path, command: str, cfg: DictConfig, overrides: list[str]) -> Path:
    """Writes what made a call, ``<out_dir>/<command>.yaml``: its command line (as a comment)
    and its config. Not ``config.yaml``: that name marks a run directory (``runs.is_run_dir``).

    Returns:
        The file written.
    """
    path = Path(out_dir) / f"{command}.yaml"
    line = shlex.join(["python", f"scripts/{command}.py", *overrides])
    with atomic_write(path) as file:
        file.write(f"# {line}\n{OmegaConf.to_yaml(cfg, resolve=True)}")
    return path


def discard_unused(out_dir: str | Path, command: str) -> bool:
    """Removes a call's folder that holds nothing but its log and its ``<command>.yaml`` (a call
    that stopped at a bad setting), and the parents that claiming it created (the run's
    ``analysis/`` on its first analysis) where they are empty, so that mistakes leave no
    folders behind.

    Returns:
        Whether the folder was removed.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return False
    if {p.name for p in out_dir.iterdir()} <= {f"{command}.log", f"{command}.yaml"}:
        shutil.rmtree(out_dir)
        for parent in reversed(_CREATED_PARENTS.pop(out_dir.absolute(), [])):
            try:
                parent.rmdir()
            except OSError:  # not empty: another call wrote there meanwhile
                break
        return True
    return False


def run_call(
    command: str,
    cfg: DictConfig,
    work: Callable[[str], object],
    refused: tuple[type[BaseException], ...] = (UsageError, *BAD_INPUT_ERRORS),
) -> None:
    """Runs an analysis command's ``work(out_dir)`` in the folder Hydra made for this call,
    after recording the call (:func:`save_call`). If it stops before writing anything, the
    folder goes (:func:`discard_unused`); an error of the ``refused`` kinds ends the command
    with one ``error:`` line (exit 2), anything else propagates."""
    from hydra.core.hydra_config import HydraConfig

    out_dir = HydraConfig.get().runtime.output_dir  # this call's own folder
    save_call(out_dir, command, cfg, list(HydraConfig.get().overrides.task))
    try:
        work(out_dir)
    except BaseException as error:
        discard_unused(out_dir, command)  # stopped before writing: leave no folder behind
        if isinstance(error, refused):
            config_error_exit(str(error))
        raise


def int_setting(key: str, value: object, minimum: int = 1, null: str | None = None) -> int | None:
    """The setting ``key`` as an integer >= ``minimum``; None for null where ``null`` says what
    null means (``the whole split``).

    Raises:
        UsageError: naming the key, the value and what is allowed.
    """
    if value is None and null is not None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}"
        if null is not None:
            allowed = f"null ({null}) or {allowed}"
        raise UsageError(f"{key} must be {allowed}, got {key}={value}")
    return value


def register_resolvers() -> None:
    """Registers ``${analysis_dir:<run>,<command>,...}`` with OmegaConf (once; later calls do
    nothing). Cached: a folder is claimed once per call, however often Hydra reads it."""
    if not OmegaConf.has_resolver("analysis_dir"):
        OmegaConf.register_new_resolver("analysis_dir", analysis_dir, use_cache=True)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is returned as given.

    Raises:
        UsageError: ``device=cuda`` (or ``cuda:N``) where torch sees no GPU, with what to use.
    """
    import torch

    device = str(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"device={device}: torch sees no GPU on this machine; use device=cpu, or device=auto "
            "(a GPU where there is one)"
        )
    return device
