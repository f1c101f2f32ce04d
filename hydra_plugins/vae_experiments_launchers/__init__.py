"""``hydra/launcher=submitit`` and ``hydra/launcher=slurm`` (vae_experiments/configs/hydra/launcher/):
hydra-submitit-launcher's launchers, with a line per job as it ends
(:mod:`vae_experiments.cli.job_progress`). Hydra builds launchers only from classes defined in
the ``hydra_plugins`` package; without the ``cluster`` extra there is nothing to define."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
        LocalLauncher as _LocalLauncher,
    )
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
        SlurmLauncher as _SlurmLauncher,
    )
except ImportError:  # the cluster extra is not installed
    _LocalLauncher = _SlurmLauncher = None


def _launch(launcher: Any, base: type, job_overrides: Sequence[Sequence[str]], first: int) -> Any:
    from hydra.core.utils import filter_overrides

    from vae_experiments.cli.job_progress import reporting_progress

    described = [" ".join(filter_overrides(overrides)) for overrides in job_overrides]
    with reporting_progress(described, first):
        return base.launch(launcher, job_overrides, first)


if _LocalLauncher is not None:

    class SubmititLocalLauncher(_LocalLauncher):
        """submitit's local launcher, saying as each job ends which one it was."""

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
            return _launch(self, _LocalLauncher, job_overrides, initial_job_idx)

    class SubmititSlurmLauncher(_SlurmLauncher):
        """submitit's SLURM launcher, saying as each job ends which one it was."""

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
            return _launch(self, _SlurmLauncher, job_overrides, initial_job_idx)
