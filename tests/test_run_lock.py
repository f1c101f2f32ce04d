"""One run, one directory, one writer: the run directory's lock, what a refused or mistaken
command leaves behind (nothing), and a hydra.run.dir that holds the user's own files."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.test_cli import run_cli
from vae_experiments.cli.run_dirs import refuse_existing_run_dir
from vae_experiments.runs import DIED, LOCK_FILE, RUNNING, lock, read_run, write_status

TRAIN_PY = str(REPO_ROOT / "train.py")


def write_lock(run_dir: Path, pid: int, host: str | None = None, **extra) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "host": host or socket.gethostname(), "started": "t", "command": "c"}
    (run_dir / LOCK_FILE).write_text(json.dumps({**holder, **extra}))


def dead_pid() -> int:
    """The pid of a process that has ended (and was reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def live_pid():
    """The pid of a process that runs while the test does."""
    process = subprocess.Popen(["sleep", "60"])
    yield process.pid
    process.kill()
    process.wait()


def listing(directory: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
        for p in sorted(directory.rglob("*"))
    }


def test_a_lock_is_taken_once_and_released(tmp_path):
    run_dir = tmp_path / "run"
    taken = lock.acquire(run_dir)
    holder = json.loads((run_dir / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert {"started", "command", "slurm_job_id"} <= holder.keys()
    assert lock.acquire(run_dir) is taken  # this process holds it already
    assert lock.writer_alive(run_dir) is True
    lock.release_all()  # what atexit runs
    assert not (run_dir / LOCK_FILE).exists()
    assert lock.writer_alive(run_dir) is False


def test_a_second_writer_is_refused_naming_the_pid_and_host(tmp_path, live_pid):
    write_lock(tmp_path, live_pid)
    with pytest.raises(lock.RunLocked) as refused:
        lock.acquire(tmp_path)
    message = str(refused.value)
    assert str(tmp_path) in message and f"pid {live_pid} on {socket.gethostname()}" in message
    assert "\n" not in message
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == live_pid  # left alone


def test_a_stale_lock_of_a_dead_pid_is_taken_over_with_a_warning(tmp_path, caplog):
    pid = dead_pid()
    write_lock(tmp_path, pid)
    with caplog.at_level(logging.WARNING):
        taken = lock.acquire(tmp_path)
    assert f"taking over the lock of pid {pid}" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    taken.release()


def test_of_two_takers_of_a_stale_lock_only_one_wins(tmp_path):
    write_lock(tmp_path, dead_pid())
    stale = (tmp_path / LOCK_FILE).read_text()
    # Both read the stale lock; the first removes it and takes the directory...
    lock._remove_if_unchanged(tmp_path / LOCK_FILE, stale)
    first = lock.acquire(tmp_path)
    # ... the second, late, must not remove the first one's lock.
    lock._remove_if_unchanged(tmp_path / LOCK_FILE, stale)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]
    first.release()


def test_a_lock_from_another_host_is_refused_with_how_to_remove_it(tmp_path):
    write_lock(tmp_path, 1234, host="other-node")
    with pytest.raises(lock.RunLocked, match=f"delete {tmp_path / LOCK_FILE}"):
        lock.acquire(tmp_path)
    assert lock.writer_alive(tmp_path) is None  # cannot be told from here


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    write_lock(tmp_path, 1234, host="other-node", slurm_job_id="77", slurm_restart_count=0)
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(lock.RunLocked):
        lock.acquire(tmp_path)  # another job's lock
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    taken = lock.acquire(tmp_path)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["slurm_restart_count"] == 1
    taken.release()


def test_discard_removes_a_fresh_run_directory_and_the_parents_it_made(tmp_path):
    run_dir = tmp_path / "outputs" / "2026-01-01" / "12-00-00"
    taken = lock.acquire(run_dir, lock.missing_dirs(run_dir))
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (run_dir / "train.log").write_text("log\n")
    taken.discard()
    assert list(tmp_path.iterdir()) == []


def test_discard_leaves_an_existing_run_exactly_as_it_was(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    (run_dir / "config.yaml").write_text("seed: 0\n")
    (run_dir / "train.log").write_text("earlier lines\n")
    write_status(run_dir, "interrupted", resume_command="python train.py resume=run")
    before = listing(run_dir)

    taken = lock.acquire(run_dir)
    with open(run_dir / "train.log", "a") as log_file:  # what this command logged
        log_file.write("this command's lines\n")
    write_status(run_dir, "failed", error="ConfigError")
    assert not taken.wrote_checkpoints()
    taken.discard()
    assert listing(run_dir) == before


def test_summarize_says_died_for_a_running_run_whose_process_is_gone(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    write_status(tmp_path, RUNNING, pid=123)
    write_lock(tmp_path, dead_pid())
    record = read_run(tmp_path)
    assert record.status == DIED and "pid 123" in record.error
    (tmp_path / LOCK_FILE).unlink()  # no lock at all: died too
    assert read_run(tmp_path).status == DIED
    taken = lock.acquire(tmp_path)  # a live writer: running
    assert read_run(tmp_path).status == RUNNING
    taken.release()


def test_a_run_dir_with_the_users_own_files_is_refused(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    refuse_existing_run_dir([f"hydra.run.dir={mine}"])  # empty: fine
    (mine / "notes.txt").write_text("my notes")
    with pytest.raises(SystemExit, match=r"holds files that are not a run \(notes.txt\)"):
        refuse_existing_run_dir([f"hydra.run.dir={mine}"])
    with pytest.raises(SystemExit, match=r"holds files that are not runs \(notes.txt\)"):
        refuse_existing_run_dir(["-m", f"hydra.sweep.dir={mine}"])


def test_train_py_into_a_locked_directory_is_refused_before_writing(tmp_path, live_pid):
    run_dir = tmp_path / "run"
    write_lock(run_dir, live_pid)
    before = listing(run_dir)
    result = run_cli(
        [sys.executable, TRAIN_PY, "trainer=cpu", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        expect_success=False,
    )
    assert result.returncode == 1
    assert f"error: {run_dir} is in use by another run: pid {live_pid} on" in result.stderr
    assert listing(run_dir) == before  # no .hydra, no train.log, the lock as it was


def test_a_config_mistake_is_one_line_and_leaves_no_folder(tmp_path):
    result = run_cli(
        [sys.executable, TRAIN_PY, "data=image_folder"], cwd=tmp_path, expect_success=False
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: data.source.path is required") and len(lines) <= 2
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # no outputs/<date>/<time>/ left


@pytest.mark.slow  # the mechanism: test_discard_leaves_an_existing_run_exactly_as_it_was
def test_a_corrected_command_runs_in_the_directory_of_a_mistaken_one(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = run_cli(
        [sys.executable, TRAIN_PY, "trainer=cpu", "optimizer.lr=abc", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        expect_success=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: optimizer.lr=abc is invalid: must be a number"
    assert list(run_dir.iterdir()) == []  # as it was: empty, no .hydra, status.json or lock
    refuse_existing_run_dir([f"hydra.run.dir={run_dir}"])  # the corrected command may go there
