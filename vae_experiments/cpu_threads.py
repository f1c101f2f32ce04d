"""How many threads torch computes with on the CPU (the config's ``threads``, default ``auto``).

torch's own default is one thread per physical core of the machine, whatever share of it the
process may use: a job pinned to 4 cores of a 64-core node (a SLURM or container cpuset, a
``taskset``), a container with a CPU quota, or one of ``n_jobs`` jobs that a launcher runs at once
then starts more threads than it has cores, and each thread waits for the others at every
parallel operation. ``auto`` picks the cores this process may use instead:

1. the CPUs it may run on: its CPU affinity (``os.sched_getaffinity``), at most a cgroup's CPU
   quota (``cpu.max``, what ``docker --cpus`` sets), at most torch's default;
2. divided among the processes that run at once on this machine: the jobs of
   ``hydra/launcher=joblib`` (``n_jobs``), the processes of DDP on the CPU; one thread at least;
3. ``OMP_NUM_THREADS``, when set and no launcher shares the CPUs, as torch itself reads it.

What it cannot see is other busy processes on the same cores (a shared machine): there, fewer
threads than cores are faster (``threads=1``), which README's "Speed" section says. The number
of threads can change the last bits of float sums, so a run that must reproduce another bit for
bit uses the same ``threads``; the run's log says which were used.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)

#: ``threads: auto``: chosen from the machine (see the module's docstring).
AUTO = "auto"

#: Where cgroup v2 keeps the CPU quota of this process's group ("max 100000": none).
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")

_torch_default: int | None = None  # torch's thread count before we first set it
_logged: tuple[int, str] | None = None  # the choice last logged in this process


def cgroup_cpu_quota(path: Path | None = None) -> float | None:
    """CPUs' worth of time that this process's cgroup may use (``docker --cpus=2``: 2.0), or
    None without a quota (or without cgroup v2). ``path``: :data:`CGROUP_CPU_MAX`."""
    try:
        quota, period = (path or CGROUP_CPU_MAX).read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity, at most its cgroup's quota (rounded up)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows: no affinity to read
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def choose_threads(
    setting: int | str, parallel_jobs: int = 1, torch_default: int = 0
) -> tuple[int, str]:
    """The number of threads for ``threads=<setting>``, and why (for the log).

    Args:
        setting: ``auto``, or a number of threads >= 1.
        parallel_jobs: processes that run at once on this machine, sharing its CPUs (a
            launcher's jobs, DDP's processes).
        torch_default: torch's own thread count (one per physical core, or
            ``OMP_NUM_THREADS``); 0 for no bound.

    Returns:
        (threads, the reason, e.g. ``auto: 4 CPUs available to this process``).
    """
    if setting != AUTO:
        return int(setting), f"threads={setting}"
    cpus = available_cpus()
    if torch_default:
        cpus = min(cpus, torch_default)
    if parallel_jobs > 1:
        threads = max(1, cpus // parallel_jobs)
        return threads, f"auto: {cpus} CPUs shared by {parallel_jobs} processes at once"
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) >= 1:
        return int(omp), f"auto: OMP_NUM_THREADS={omp}"
    return cpus, f"auto: {cpus} CPUs available to this process"


def use_threads(setting: int | str = AUTO, parallel_jobs: int = 1) -> int:
    """Sets torch's number of CPU threads for ``threads=<setting>`` (:func:`choose_threads`)
    and logs the choice, once per process unless it changes.

    Returns:
        The number of threads now in use.
    """
    global _torch_default, _logged
    import torch

    if _torch_default is None:
        _torch_default = torch.get_num_threads()
    threads, why = choose_threads(setting, parallel_jobs, _torch_default)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if _logged != (threads, why):
        _logged = (threads, why)
        hint = "; threads=1 is faster where other busy processes share the cores"
        log.info("CPU threads: %d (%s%s)", threads, why, hint if threads > 1 else "")
    return threads
