"""vae-experiments: config-driven experiments with autoencoders and VAEs.

``from vae_experiments import load_run`` is the short way to :func:`vae_experiments.runs.load_run`;
it is imported on first use, so that the command-line tools start without loading torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_run", "read_metrics"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        from vae_experiments import runs

        return getattr(runs, name)
    raise AttributeError(f"module 'vae_experiments' has no attribute {name!r}")
