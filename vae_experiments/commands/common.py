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


def run_dir_of(run: str | Path | None) -> Path:
    """The run directory of ``run``: a run directory, or a checkpoint ``<run>/checkpoints/x.ckpt``.

    Raises:
        ValueError: if ``run`` is missing (None, empty).
        FileNotFoundError: if it holds no ``.hydra/config.yaml`` (not a run directory).
    """
    if run is None or str(run) in ("", "???"):
        raise ValueError(
            "no run given: the command needs run=<run directory or checkpoint> (one run per command: "
            "-m can sweep other settings, loop in the shell over several runs)"
        )
    path = Path(str(run)).expanduser()
    run_dir = path.parent.parent if path.suffix == ".ckpt" else path
    if path.suffix == ".ckpt" and not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; pass run=<run dir or .ckpt file>")
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a run directory (no {CONFIG_FILE} in it); pass run=<the directory "
            "train.py printed, or a .ckpt file in its checkpoints/ folder>"
        )
    return run_dir


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
