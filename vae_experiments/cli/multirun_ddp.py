"""DDP inside a Hydra multirun: the extra processes of a job run that job, in its directory.

Lightning's DDP launcher starts ranks 1..N-1 of a node by re-running the command line
(``sys.argv``) with ``hydra.run.dir=<HydraConfig run.dir>`` appended. Under ``-m`` that command is
the whole sweep, and ``run.dir`` is the single-run default (``outputs/<now>``): every child would
run every job of the sweep into new directories. And the launcher leaves its environment
variables (``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT``...) and the process group behind, so the
next job of the sweep would take itself for an already launched rank and talk to the finished
job's processes. :func:`ddp_sweep_job` runs one job so that its children run exactly that job, as
a single run, into the job's own output directory, and the next job starts afresh.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, read_write

# Hydra settings that belong to the sweep, not to one job; the children run a plain single run.
_SWEEP_ONLY_PREFIXES = (
    "hydra.mode",
    "hydra.sweep",
    "hydra.sweeper",
    "hydra/sweeper",
    "hydra.launcher",
    "hydra/launcher",
    "hydra.run.dir",
)
# Command-line flags of Hydra that take a value and must reach the children unchanged.
_VALUE_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")


def _config_flags(argv: Sequence[str]) -> list[str]:
    """The ``--config-path/-name/-dir`` flags (with their values) among ``argv``."""
    flags: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in _VALUE_FLAGS:
            flags += [arg, next(args, "")]
        elif arg.startswith(tuple(f"{flag}=" for flag in _VALUE_FLAGS)):
            flags.append(arg)
    return flags


def job_command(
    argv: Sequence[str], task_overrides: Sequence[str], hydra_overrides: Sequence[str]
) -> list[str]:
    """The command line that runs one job of a sweep as a single run.

    Args:
        argv: the sweep's command line (``sys.argv``).
        task_overrides: the job's overrides (``hydra.overrides.task``: its swept values included).
        hydra_overrides: ``hydra.overrides.hydra``; the sweep's own settings are dropped.

    Returns:
        ``[argv[0], <config flags>, <hydra overrides>, <task overrides>]``, without ``-m``.
    """
    kept = [o for o in hydra_overrides if not o.lstrip("+~").startswith(_SWEEP_ONLY_PREFIXES)]
    return [argv[0], *_config_flags(argv[1:]), *kept, *task_overrides]


def _starts_children_by_command(trainer_cfg: Mapping[str, Any]) -> bool:
    """True if Lightning would start this node's extra ranks by re-running the command line."""
    strategy = trainer_cfg.get("strategy", "auto")
    if not isinstance(strategy, str) or not strategy.startswith("ddp"):
        return False
    if any(word in strategy for word in ("spawn", "fork", "notebook")):
        return False
    if "LOCAL_RANK" in os.environ or "SLURM_NTASKS" in os.environ:
        return False  # torchrun or srun started the ranks
    devices = trainer_cfg.get("devices", "auto")
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return len(devices) > 1
    if str(devices) in ("auto", "-1"):
        return trainer_cfg.get("accelerator", "auto") != "cpu"
    return str(devices) not in ("0", "1")


def check_children_can_start(trainer_cfg: Mapping[str, Any]) -> None:
    """Raises ValueError if DDP would re-run a command line that is not this app's.

    Launchers that run each job in a worker started as ``python -m <module>`` (submitit's
    ``submitit.core._submit``, joblib's loky workers) leave Lightning nothing to re-run: it would
    start that module with our overrides.
    """
    main_spec = getattr(sys.modules["__main__"], "__spec__", None)
    if main_spec is None or not _starts_children_by_command(trainer_cfg):
        return
    raise ValueError(
        f"trainer.strategy={trainer_cfg.get('strategy')} starts its extra processes by re-running "
        f"the command line, but this job runs inside a launcher's worker (`python -m "
        f"{main_spec.name}`, e.g. hydra/launcher=joblib or submitit_local) that cannot be re-run. "
        "Sweep DDP jobs with the default launcher (one job after another), or on SLURM with "
        "hydra/launcher=slurm and hydra.launcher.tasks_per_node=<devices> (srun starts the "
        "processes)"
    )


@contextmanager
def ddp_sweep_job(trainer_cfg: Mapping[str, Any]) -> Iterator[None]:
    """Runs the body as one job of a multirun, ready for DDP (a no-op outside multiruns).

    While active, ``sys.argv`` is this job's command as a single run and Hydra's ``run.dir`` is
    the job's output directory, which Lightning appends to the children's command; so every rank
    of the job shares the job's directory and the sweep is not started again. On exit the
    environment variables are restored and the process group, if any, is destroyed.

    Args:
        trainer_cfg: the ``trainer`` config, to fail early where children cannot be started
            (see :func:`check_children_can_start`).
    """
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        yield
        return
    check_children_can_start(trainer_cfg)
    hydra_cfg = HydraConfig.get()
    saved_argv, saved_environ = sys.argv, dict(os.environ)
    saved_run_dir = OmegaConf.to_container(hydra_cfg.run, resolve=False)["dir"]
    sys.argv = job_command(
        sys.argv, list(hydra_cfg.overrides.task), list(hydra_cfg.overrides.hydra)
    )
    with read_write(hydra_cfg.run):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        _destroy_process_group()
        os.environ.clear()
        os.environ.update(saved_environ)
        sys.argv = saved_argv
        with read_write(hydra_cfg.run):
            hydra_cfg.run.dir = saved_run_dir


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
