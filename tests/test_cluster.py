"""Sweeps beyond one process: submitit's local launcher, and our SLURM launcher config run through
a stand-in ``sbatch``/``srun`` (tests/fake_slurm.py; no real cluster is involved)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from tests.conftest import CONFIG_DIR, REPO_ROOT, sweep_job
from tests.fake_slurm import fake_slurm_env, install_fake_slurm
from tests.test_cli import QUICK

pytest.importorskip(
    "hydra_plugins.hydra_submitit_launcher",
    reason='needs the cluster extra: pip install -e ".[cluster]"',
)

TRAIN = [sys.executable, str(REPO_ROOT / "train.py")]


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300):
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def finished_jobs(sweep_dir: Path) -> list[str]:
    """Numbers of the job directories of a sweep, each checked to hold a finished run."""
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for job in jobs:
        assert json.loads((sweep_dir / job / "status.json").read_text())["status"] == "finished"
        assert "test/loss" in json.loads((sweep_dir / job / "metrics.json").read_text())
    return [job.partition("-")[0] for job in jobs]


@pytest.mark.slow  # about 25 s; the default suite checks the launchers' settings (sbatch script)
def test_submitit_local_runs_a_tiny_sweep_saying_as_each_job_ends(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run(
        [
            *TRAIN,
            "-m",
            "hydra/launcher=submitit",
            "model.latent_dim=2,4",
            *QUICK,
            "logger=none",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
    )
    assert finished_jobs(sweep_dir) == ["0", "1"]
    output = result.stdout + result.stderr
    said = re.findall(r"job [12] of 2 finished after \d+ s: #(\d) (\S+)", output)
    assert sorted(said) == [("0", "model.latent_dim=2"), ("1", "model.latent_dim=4")]
    for job, latent_dim in (("0", 2), ("1", 4)):
        hydra_cfg = yaml.safe_load(
            (sweep_job(sweep_dir, job) / ".hydra" / "hydra.yaml").read_text()
        )
        assert hydra_cfg["hydra"]["launcher"]["_target_"].endswith("LocalLauncher")
        job_id = hydra_cfg["hydra"]["job"]["id"]  # submitit's id: the job ran as its own process
        assert list((sweep_dir / ".submitit" / job_id).glob("*_result.pkl"))
        config = yaml.safe_load((sweep_job(sweep_dir, job) / ".hydra" / "config.yaml").read_text())
        assert config["model"]["latent_dim"] == latent_dim


def test_slurm_launcher_defaults_and_their_links_to_the_trainer():
    overrides = ["hydra/launcher=slurm", "trainer.num_nodes=2", "hydra.launcher.gpus_per_node=4"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        full = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = full.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    assert launcher.additional_parameters.signal == "USR1@120"
    assert launcher.additional_parameters.requeue is True


def sbatch_scripts(state_dir: Path) -> list[str]:
    return [p.read_text() for p in sorted(state_dir.glob("*.sbatch"))]


def test_slurm_launcher_writes_our_settings_into_the_sbatch_script(tmp_path):
    bin_dir, state_dir, sweep_dir = tmp_path / "bin", tmp_path / "slurm", tmp_path / "sweep"
    install_fake_slurm(bin_dir)
    run(
        [
            *TRAIN,
            "-m",
            "hydra/launcher=slurm",
            "hydra.launcher.partition=debug",
            "hydra.launcher.timeout_min=30",
            "hydra.launcher.gpus_per_node=null",
            "hydra.launcher.tasks_per_node=1",
            *QUICK,
            "logger=none",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
        env=fake_slurm_env(bin_dir, state_dir),
    )
    [script] = sbatch_scripts(state_dir)
    flags = set(re.findall(r"^#SBATCH (\S+)$", script, re.M))
    assert {
        "--signal=USR1@120",  # SIGUSR1 two minutes before the time limit, for Lightning
        "--requeue",
        "--partition=debug",
        "--time=30",
        "--nodes=1",
        "--ntasks-per-node=1",
        "--cpus-per-task=4",
        "--mem=32GB",
        "--job-name=train",
    } <= flags
    assert "srun" in script and "submitit.core._submit" in script
    assert finished_jobs(sweep_dir) == ["0"]


@pytest.mark.slow  # about 30 s: two DDP jobs of two srun tasks each
def test_ddp_sweep_on_slurm_has_one_directory_per_job(tmp_path):
    bin_dir, state_dir, sweep_dir = tmp_path / "bin", tmp_path / "slurm", tmp_path / "sweep"
    install_fake_slurm(bin_dir)
    run(
        [
            *TRAIN,
            "-m",
            "hydra/launcher=slurm",
            "hydra.launcher.gpus_per_node=null",
            "hydra.launcher.tasks_per_node=2",
            "model.latent_dim=2,4",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            *QUICK[1:],
            "logger=none",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
        env=fake_slurm_env(bin_dir, state_dir),
    )
    [script] = sbatch_scripts(state_dir)
    assert "#SBATCH --array=0-1%2" in script and "#SBATCH --ntasks-per-node=2" in script
    assert finished_jobs(sweep_dir) == ["0", "1"]
    for job in ("0", "1"):
        assert (
            json.loads((sweep_job(sweep_dir, job) / "metrics.json").read_text())["world_size"] == 2
        )
        log = (
            sweep_job(sweep_dir, job) / "train.log"
        ).read_text()  # srun started both ranks: one log
        assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log
        assert sorted(p.name for p in (sweep_job(sweep_dir, job) / "checkpoints").iterdir()) == [
            "best.ckpt",
            "last.ckpt",
        ]


@pytest.mark.slow  # about 40 s: a training interrupted by the time-limit signal, then resumed
def test_time_limit_signal_checkpoints_and_the_requeued_job_resumes(tmp_path):
    # What SLURM does with our launcher config: SIGUSR1 before the time limit, then (after
    # `scontrol requeue`) SIGTERM, and later the same command again in the same run directory.
    bin_dir, run_dir = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls.txt"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        **{
            "SLURM_NTASKS": "1",
            "SLURM_NTASKS_PER_NODE": "1",
            "SLURM_NNODES": "1",
            "SLURM_JOB_NAME": "train",
            "SLURM_JOB_ID": "4321",
            "SLURM_PROCID": "0",
            "SLURM_LOCALID": "0",
            "SLURM_NODEID": "0",
            "SLURM_NODELIST": "localhost",
        },
    }
    command = [
        *TRAIN,
        "trainer=cpu",
        "trainer.enable_progress_bar=false",
        "model.network.channels=[4,8]",
        "logger=none",
        f"hydra.run.dir={run_dir}",
    ]
    process = subprocess.Popen(
        [*command, "trainer.max_epochs=10000"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "last.ckpt").is_file():
            assert process.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        process.send_signal(signal.SIGUSR1)
        while not calls.is_file():
            assert process.poll() is None and time.monotonic() < deadline, "no requeue"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        process.kill()
    assert calls.read_text().split() == ["requeue", "4321"]
    [checkpoint] = run_dir.glob("hpc_ckpt_*.ckpt")
    import torch

    interrupted_at = torch.load(checkpoint, weights_only=False)["epoch"]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"

    # The requeued job: the same command; it continues from the checkpoint, not from scratch.
    result = run([*command, f"trainer.max_epochs={interrupted_at + 2}"], cwd=tmp_path, env=env)
    output = result.stdout + result.stderr
    assert f"Restored all states from the checkpoint at {checkpoint}" in output
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == interrupted_at + 2
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
