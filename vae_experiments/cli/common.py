"""Shared by the analysis commands about one trained run: where their outputs go.

``python scripts/<command>.py run=<run dir or checkpoint>`` writes into ``<run dir>/analysis/``.
Hydra's own output follows it there, through the ``analysis_dir`` resolver in the command's
config, so that no ``outputs/`` folder appears and the run's ``.hydra/`` is never overwritten::

    hydra:
      run:
        dir: ${analysis_dir:${oc.select:run,null}}   # oc.select: a missing run= gets our message
      output_subdir: null

Call :func:`register_resolvers` at import time of the module defining the ``@hydra.main``
function (before Hydra composes the config).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from vae_experiments.runs import CONFIG_FILE

ANALYSIS_SUBDIR = "analysis"


def run_dir_of(run: str | Path | None, key: str = "run") -> Path:
    """The run directory of ``run``: a run directory, or a checkpoint in one (in its
    ``checkpoints/`` folder, or Lightning's SLURM ``hpc_ckpt_<n>.ckpt`` beside it).

    Args:
        run: what the command line gave.
        key: the command-line key it came from, for the messages (``run``, ``resume``).

    Raises:
        ValueError: if ``run`` is missing (None, empty).
        FileNotFoundError: if it is no run directory (none holds ``.hydra/config.yaml``).
    """
    if run is None or str(run) in ("", "???"):
        raise ValueError(
            f"no run given: the command needs {key}=<run directory or checkpoint> (one run per "
            "command: -m can sweep other settings, loop in the shell over several runs)"
        )
    path = Path(str(run)).expanduser()
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise FileNotFoundError(f"{key}={run}: no such checkpoint file")
        for run_dir in (path.parent.parent, path.parent):
            if (run_dir / CONFIG_FILE).is_file():
                return run_dir
        raise FileNotFoundError(f"{key}={run}: the checkpoint is not inside a run directory")
    if not (path / CONFIG_FILE).is_file():
        what = "does not exist" if not path.exists() else f"has no {CONFIG_FILE}"
        raise FileNotFoundError(
            f"{key}={run}: {path} is not a run directory: it {what}; pass the run directory "
            "that train.py printed (outputs/<date>/<time>), or a .ckpt file in its "
            "checkpoints/ folder"
        )
    return path


def analysis_dir(run: str | Path | None) -> str:
    """``<run dir>/analysis`` for a run directory or a checkpoint in it (an OmegaConf resolver).

    A bad ``run=`` exits with a one-line message before Hydra creates any directory (OmegaConf
    would wrap an exception into a long traceback; SystemExit passes through as it is).
    """
    try:
        return str(run_dir_of(run) / ANALYSIS_SUBDIR)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None


def register_resolvers() -> None:
    """Registers ``${analysis_dir:<run>}`` with OmegaConf (once; later calls do nothing)."""
    if not OmegaConf.has_resolver("analysis_dir"):
        OmegaConf.register_new_resolver("analysis_dir", analysis_dir)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is returned as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
