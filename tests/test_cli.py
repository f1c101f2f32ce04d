"""The command line as users type it: a run, a multirun sweep, and 2-process DDP on CPU (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, sweep_job
from vae_experiments.cli.multirun_ddp import check_children_can_start, job_command
from vae_experiments.runs import EVENT_FILE_GLOB, tensorboard_dir

QUICK = [
    "trainer=cpu",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=4",
    "+trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "data.batch_size=16",
]
# The default VAE's conv network, small (the sweep over linear_ae, ae and vae keeps the default
# channels: the linear AE's network has none; on 8x8 digits they make two blocks of 32 and 64).
SMALL_CONV = "model.network.channels=[4,8]"


def run_cli(
    args: list[str], cwd: Path, timeout: int = 300, expect_success: bool = True
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if expect_success:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_train_py_writes_a_complete_run_directory(tmp_path):
    run_dir = tmp_path / "my_run"
    run_cli(
        [
            sys.executable,
            str(REPO_ROOT / "train.py"),
            *QUICK,
            SMALL_CONV,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    assert {p.name for p in run_dir.iterdir()} >= {
        ".hydra",
        "checkpoints",
        "images",
        "metrics.json",
        "train.log",
    }
    assert list(run_dir.glob(EVENT_FILE_GLOB))  # TensorBoard's, in the run directory itself
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["model"]["_target_"] == "vae_experiments.models.VAE"
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 4
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    assert not (tmp_path / "lightning_logs").exists()


@pytest.mark.skipif(shutil.which("vae-train") is None, reason="package not installed")
def test_console_script_shows_the_config(tmp_path):
    result = run_cli(["vae-train", "--cfg", "job", "model=ae", "model/network=mlp"], cwd=tmp_path)
    config = yaml.safe_load(result.stdout)
    assert config["model"]["network"]["_target_"].endswith(".MLP")
    assert config["data"]["source"]["_target_"] == "vae_experiments.data.Digits"


@pytest.mark.slow  # a sweep of four runs; test_a_failing_job_is_recorded_and_the_sweep_goes_on sweeps by default
def test_sweep_over_models_and_latent_sizes(tmp_path):
    sweep_dir = tmp_path / "sweep"
    run_cli(
        [
            sys.executable,
            str(REPO_ROOT / "train.py"),
            "-m",
            "model=linear_ae,ae,vae",
            "model.latent_dim=2,16",
            *QUICK,
            f"hydra.sweep.dir={sweep_dir}",
            "logger=none",
        ],
        cwd=tmp_path,
        timeout=600,
    )
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    # Job folders are <job number>-<what it is> (e.g. 0-linear_ae-digits-latent_dim=2-...).
    assert sorted(int(p.name.split("-")[0]) for p in jobs) == list(range(6))
    seen = set()
    for job in jobs:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        seen.add(tuple(o for o in overrides if o.startswith(("model=", "model.latent_dim="))))
        metrics = json.loads((job / "metrics.json").read_text())
        assert "test/recon_mse" in metrics
        assert ("test/elbo" in metrics) == ("model=vae" in overrides)
    assert len(seen) == 6


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        [
            sys.executable,
            str(REPO_ROOT / "train.py"),
            "-m",
            "model=ae",
            "model/network=mlp",
            "model.network.hidden_dims=[16]",
            "model.latent_dim=0,3",
            *QUICK,
            f"hydra.sweep.dir={sweep_dir}",
            "logger=none",
        ],
        cwd=tmp_path,
        expect_success=False,
    )
    assert result.returncode != 0  # the sweep as a whole reports the failure
    failed = json.loads((sweep_job(sweep_dir, 0) / "status.json").read_text())
    assert failed["status"] == "failed"
    assert "model.latent_dim=0 is invalid: must be an integer >= 1" in failed["error"]
    assert not (sweep_job(sweep_dir, 0) / "metrics.json").exists()
    finished = json.loads((sweep_job(sweep_dir, 1) / "status.json").read_text())
    assert finished["status"] == "finished"
    assert (sweep_job(sweep_dir, 1) / "metrics.json").is_file()

    summary = run_cli(
        [sys.executable, str(REPO_ROOT / "scripts" / "summarize.py"), str(sweep_dir)], cwd=tmp_path
    )
    assert "model.latent_dim=0 is invalid" in (sweep_dir / "summary.md").read_text()
    assert summary.returncode == 0


def test_ctrl_c_marks_the_run_interrupted_with_its_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            str(REPO_ROOT / "train.py"),
            "trainer=cpu",
            "trainer.max_epochs=10000",
            "trainer.enable_progress_bar=false",
            "logger=none",
            f"hydra.run.dir={run_dir}",
        ],
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
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        process.kill()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted"
    assert status["resume_from"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert not (run_dir / "metrics.json").exists()


def test_ddp_on_cpu_with_two_processes(tmp_path):
    run_dir = tmp_path / "ddp"
    result = run_cli(
        [
            sys.executable,
            str(REPO_ROOT / "train.py"),
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            "data.batch_size=32",
            "model.network.channels=[4,8]",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in output and "GLOBAL_RANK: 1, MEMBER: 2/2" in output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    # 1294 training digits split over 2 processes: 647 each, 20 full batches of 32 per epoch.
    assert metrics["steps"] == 2 * 20
    # One set of outputs: rank 0 wrote everything; no per-rank directories or configs.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    # Event files are named events.out.tfevents.<time>.<host>.<pid>.<n>: all from one process.
    writers = {p.name.split(".")[-2] for p in tensorboard_dir(run_dir).glob(EVENT_FILE_GLOB)}
    assert len(writers) == 1
    # Active units over both processes' validation images, once per epoch (no hang, no error).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir(run_dir)))
    events.Reload()
    assert len(events.Scalars("val/active_units")) == 2
    assert "trainer/epoch" in events.Tags()["scalars"] and "epoch" not in events.Tags()["scalars"]
    configs = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("config.yaml"))
    assert configs == [".hydra/config.yaml", "config.yaml"]  # Hydra's record and the run's
    assert not (tmp_path / "outputs").exists()


def test_a_sweep_job_command_is_the_job_as_a_single_run():
    argv = ["train.py", "-m", "--config-name", "train", "model.latent_dim=2,4", "trainer=ddp"]
    hydra_overrides = [
        "hydra.sweep.dir=/tmp/s",
        "hydra.mode=MULTIRUN",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
        "hydra.verbose=true",
    ]
    command = job_command(argv, ["model.latent_dim=4", "trainer=ddp"], hydra_overrides)
    assert command == [
        "train.py",
        "--config-name",
        "train",
        "hydra.verbose=true",
        "model.latent_dim=4",
        "trainer=ddp",
    ]


@pytest.mark.slow  # about 30 s: two DDP jobs of two processes each
def test_ddp_jobs_of_a_sweep_each_write_one_directory(tmp_path):
    # Lightning starts rank 1 by re-running the command line: under -m that would be the whole
    # sweep again. Each job must run once, with both ranks in the job's own directory.
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        [
            sys.executable,
            str(REPO_ROOT / "train.py"),
            "-m",
            "model.latent_dim=2,4",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            *QUICK[1:],
            SMALL_CONV,
            "logger=none",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert output.count("Launching 2 jobs locally") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
    assert sorted(p.name.split("-")[0] for p in sweep_dir.iterdir()) == ["0", "1", "multirun.yaml"]
    for job, latent_dim in (("0", 2), ("1", 4)):
        job_dir = sweep_job(sweep_dir, job)
        assert json.loads((job_dir / "status.json").read_text())["status"] == "finished"
        assert json.loads((job_dir / "metrics.json").read_text())["world_size"] == 2
        configs = [p for p in job_dir.rglob("config.yaml") if ".hydra" not in p.parts]
        assert len(configs) == 1  # one run directory per job, whatever the processes
        assert sorted(p.name for p in (job_dir / "checkpoints").iterdir()) == [
            "best.ckpt",
            "last.ckpt",
        ]
        rank0 = (job_dir / "train.log").read_text()
        rank1 = (job_dir / "train_ddp_process_1.log").read_text()
        assert "GLOBAL_RANK: 0, MEMBER: 1/2" in rank0
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in rank1
        # Both ranks built this job's model (the parameter count depends on the latent size).
        model_line = next(line for line in rank0.splitlines() if "model VAE with" in line)
        assert model_line.split(" - ")[1] in rank1
        config = yaml.safe_load((job_dir / ".hydra" / "config.yaml").read_text())
        assert config["model"]["latent_dim"] == latent_dim


def test_ddp_in_a_launcher_worker_fails_early_with_what_to_do_instead(monkeypatch):
    from importlib.machinery import ModuleSpec

    monkeypatch.setattr(
        sys.modules["__main__"], "__spec__", ModuleSpec("submitit.core._submit", None)
    )
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    ddp = {"strategy": "ddp", "accelerator": "cpu", "devices": 2}
    with pytest.raises(ValueError) as error:
        check_children_can_start(ddp)
    assert "trainer.strategy=ddp starts its extra processes by re-running the command line" in (
        str(error.value)
    )
    assert "`python -m submitit.core._submit`" in str(error.value)
    assert "hydra/launcher=slurm and hydra.launcher.tasks_per_node=<devices>" in str(error.value)
    check_children_can_start({**ddp, "strategy": "ddp_spawn"})  # no command to re-run
    check_children_can_start({**ddp, "devices": 1})  # no extra process
    check_children_can_start({**ddp, "devices": "auto"})  # one CPU device
    monkeypatch.setenv("SLURM_NTASKS", "2")
    check_children_can_start(ddp)  # srun started the processes
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None)  # python train.py
    monkeypatch.delenv("SLURM_NTASKS")
    check_children_can_start(ddp)
