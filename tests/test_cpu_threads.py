"""threads=auto: torch's CPU threads follow the cores this process may use (its affinity, a cgroup
quota), shared among the jobs a launcher runs at once; the choice is logged once."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from hydra.types import RunMode
from omegaconf import OmegaConf

from vae_experiments import cpu_threads
from vae_experiments.cli import train as train_cli
from vae_experiments.cpu_threads import choose_threads, use_threads


@pytest.fixture
def four_cpus(monkeypatch, tmp_path):
    """A process pinned to 4 CPUs (as taskset or a SLURM cpuset would), no cgroup quota and no
    OMP_NUM_THREADS."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(cpu_threads, "CGROUP_CPU_MAX", tmp_path / "cpu.max")
    (tmp_path / "cpu.max").write_text("max 100000\n")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return tmp_path / "cpu.max"


def test_auto_takes_the_cpus_this_process_may_use(four_cpus):
    # torch's own default would be the machine's 32 physical cores.
    assert choose_threads("auto", torch_default=32) == (
        4,
        "auto: 4 CPUs available to this process",
    )
    assert choose_threads("auto", torch_default=2)[0] == 2  # never more than torch's default


def test_auto_shares_the_cpus_among_jobs_running_at_once(four_cpus):
    assert choose_threads("auto", parallel_jobs=2, torch_default=32) == (
        2,
        "auto: 4 CPUs shared by 2 processes at once",
    )
    assert choose_threads("auto", parallel_jobs=3)[0] == 1
    assert choose_threads("auto", parallel_jobs=8)[0] == 1  # one thread at least


def test_auto_follows_a_cgroup_quota_and_omp_num_threads(four_cpus, monkeypatch):
    four_cpus.write_text("150000 100000\n")  # docker --cpus=1.5
    assert choose_threads("auto")[0] == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose_threads("auto") == (1, "auto: OMP_NUM_THREADS=1")


def test_a_number_is_taken_as_it_is(four_cpus):
    assert choose_threads(3, parallel_jobs=2) == (3, "threads=3")


def test_use_threads_sets_torch_and_logs_the_choice_once(four_cpus, monkeypatch, caplog):
    before = torch.get_num_threads()
    monkeypatch.setattr(cpu_threads, "_logged", None)
    monkeypatch.setattr(cpu_threads, "_torch_default", 32)  # a machine of 32 physical cores
    try:
        with caplog.at_level(logging.INFO, logger="vae_experiments.cpu_threads"):
            assert use_threads(1) == 1
            assert use_threads(1) == 1
            assert torch.get_num_threads() == 1
            use_threads("auto", parallel_jobs=2)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "CPU threads: 1 (threads=1)",
        "CPU threads: 2 (auto: 4 CPUs shared by 2 processes at once; threads=1 is faster "
        "where other busy processes share the cores)",
    ]


@pytest.mark.parametrize(
    ("mode", "launcher", "expected"),
    [
        (RunMode.RUN, {}, 1),
        (RunMode.MULTIRUN, {"_target_": "hydra._internal.core_plugins.BasicLauncher"}, 1),
        (RunMode.MULTIRUN, {"_target_": "hydra_plugins.joblib.JoblibLauncher", "n_jobs": 2}, 2),
        (RunMode.MULTIRUN, {"_target_": "hydra_plugins.joblib.JoblibLauncher", "n_jobs": -1}, 6),
    ],
)
def test_the_joblib_launchers_jobs_run_at_once(monkeypatch, mode, launcher, expected):
    hydra_cfg = OmegaConf.create({"mode": mode, "launcher": launcher})
    monkeypatch.setattr(train_cli.HydraConfig, "get", staticmethod(lambda: hydra_cfg))
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert train_cli.parallel_jobs() == expected


def test_the_thread_count_is_no_part_of_a_runs_name():
    from vae_experiments.cli.run_dirs import run_name

    assert (
        run_name("vae", "digits", ["threads=1", "model.latent_dim=8"]) == "vae-digits-latent_dim=8"
    )
