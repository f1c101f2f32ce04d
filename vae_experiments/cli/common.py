"""Shared by the analysis commands about one trained run: where their outputs go (a Hydra
resolver) and which device they use.

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

from vae_experiments.runs import ANALYSIS_DIR, run_dir_of


def analysis_dir(run: str | Path | None) -> str:
    """``<run dir>/analysis`` for a run directory or a checkpoint in it (an OmegaConf resolver).

    A bad ``run=`` exits with a one-line message before Hydra creates any directory (OmegaConf
    would wrap an exception into a long traceback; SystemExit passes through as it is).
    """
    try:
        return str(run_dir_of(run) / ANALYSIS_DIR)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None


def register_resolvers() -> None:
    """Registers ``${analysis_dir:<run>}`` with OmegaConf (once; later calls do nothing)."""
    if not OmegaConf.has_resolver("analysis_dir"):
        OmegaConf.register_new_resolver("analysis_dir", analysis_dir)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else is returned as given.

    Raises:
        ValueError: ``device=cuda`` (or ``cuda:N``) where torch sees no GPU, with what to use.
    """
    import torch

    device = str(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device={device}: torch sees no GPU on this machine; use device=cpu, or device=auto "
            "(a GPU where there is one)"
        )
    return device
