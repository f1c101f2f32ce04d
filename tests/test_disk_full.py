"""A disk that fills mid-run, or before it (the run's lock): one line naming the file and the
free space, the old file intact, nothing half-written left.

The full disk is simulated in process: ``os.fsync`` or the file's ``write`` raises the OSError
the OS raises (ENOSPC, or EDQUOT for a full quota); for ``train.py`` as typed, by a wrapper
script that does the same before running it."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import FAST, MLP_64, REPO_ROOT
from tests.test_cli import run_cli
from vae_experiments.cli import train as train_cli
from vae_experiments.pictures import save_grid
from vae_experiments.runs import DiskFullError, lock, read_status, save_config, write_status
from vae_experiments.training.checkpoint_io import save_atomic

DISK_FULL = {
    errno.ENOSPC: "no space left on device writing",
    errno.EDQUOT: "disk quota exceeded writing",
}


def fsync_fails(monkeypatch, code: int = errno.ENOSPC) -> None:
    def fsync(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fsync)


class FillsUp:
    """A file that takes ``room`` more bytes, then fails its writes as a full disk does."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def torch_save_fills_the_disk(monkeypatch) -> None:
    """``torch.save`` into a file fails as on a full disk: torch raises a RuntimeError
    ("unexpected pos") while handling the OSError."""
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, FillsUp(f, room=200)))


def assert_one_line_naming(error: DiskFullError, path, code: int = errno.ENOSPC) -> None:
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"{DISK_FULL[code]} {path}: ")
    assert " free of " in message and "is intact" in message
    assert isinstance(error, OSError) and error.errno == code and error.filename == str(path)


def write_status_file(run_dir):
    write_status(run_dir, "finished")
    return run_dir / "status.json"


def write_config_file(run_dir):
    # Another value each call: the same config again writes nothing.
    latent_dim = 2 + len(list(run_dir.glob("config*.yaml")))
    save_config(run_dir, OmegaConf.create({"model": {"latent_dim": latent_dim}}))
    return run_dir / "config.yaml"


def write_image_grid(run_dir):
    return save_grid(torch.rand(3, 4, 4), run_dir / "images" / "epoch.png")


WRITERS = [write_status_file, write_config_file, write_image_grid]


@pytest.mark.parametrize("code", list(DISK_FULL), ids=["ENOSPC", "EDQUOT"])
@pytest.mark.parametrize("writer", WRITERS, ids=lambda w: w.__name__)
def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, writer, code):
    path = writer(tmp_path)
    before = path.read_bytes()
    fsync_fails(monkeypatch, code)
    with pytest.raises(DiskFullError) as info:
        writer(tmp_path)
    assert_one_line_naming(info.value, path, code)
    assert info.value.__suppress_context__  # no chained traceback behind the line
    assert path.read_bytes() == before
    assert not list(path.parent.glob(".*.tmp"))  # the partial file is gone


def test_a_checkpoint_that_does_not_fit_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save_atomic({"weights": torch.ones(3)}, path)
    torch_save_fills_the_disk(monkeypatch)
    with pytest.raises(DiskFullError) as info:
        save_atomic({"weights": torch.zeros(10_000)}, path)
    assert_one_line_naming(info.value, path)
    assert torch.load(path, weights_only=True)["weights"].tolist() == [1.0, 1.0, 1.0]
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_other_os_errors_pass_unchanged(tmp_path, monkeypatch):
    fsync_fails(monkeypatch, errno.EIO)
    with pytest.raises(OSError) as info:
        write_status(tmp_path, "finished")
    assert type(info.value) is OSError and info.value.errno == errno.EIO


def test_train_py_on_a_full_disk_prints_one_line_and_records_it(tmp_path, monkeypatch, capsys):
    # Through Lightning: the checkpoint IO plugin raises inside trainer.fit, Lightning re-raises
    # it, and train.py prints the one line (no traceback) and records it in status.json.
    run_dir = tmp_path / "run"
    args = [*FAST, *MLP_64, "trainer.max_epochs=1", "+trainer.limit_train_batches=2"]
    args += ["+trainer.limit_val_batches=1", "logger=none", f"hydra.run.dir={run_dir}"]
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    torch_save_fills_the_disk(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        train_cli.main()
    message = exit_.value.code  # a string: Python prints it to stderr and exits with 1
    assert isinstance(message, str)
    assert message.startswith(f"error: no space left on device writing {run_dir / 'checkpoints'}")
    assert "Traceback" not in capsys.readouterr().err
    status = read_status(run_dir)
    assert status["status"] == "failed" and status["error"].startswith("DiskFullError: no space")


# --- the run's lock ---------------------------------------------------------------------------

# Runs a command (train.py ARGS...) on a disk that is full when the run's lock is written: the
# temporary lock file takes half its text, then the write fails as the OS fails it.
FULL_WHEN_LOCKING = """
import errno, pathlib, runpy, sys

real_write_text = pathlib.Path.write_text


def write_text(self, data, *args, **kwargs):
    if self.name.startswith(".lock.json.") and self.name.endswith(".tmp"):
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_write_text(self, data, *args, **kwargs)


pathlib.Path.write_text = write_text
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def lock_write_fills_the_disk(monkeypatch) -> None:
    """The temporary lock file, then the lock file itself (filesystems without hard links),
    fail to be written as on a full disk."""
    real_write_text = Path.write_text

    def write_text(self, data, *args, **kwargs):
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_text)


def test_a_lock_that_does_not_fit_leaves_no_file_and_no_directory(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "x"
    lock_write_fills_the_disk(monkeypatch)
    with pytest.raises(DiskFullError) as info:
        lock.acquire(run_dir)
    assert_one_line_naming(info.value, run_dir / "lock.json")
    assert info.value.__suppress_context__
    assert list(tmp_path.iterdir()) == []  # no .lock.json.<pid>.<hex>.tmp, no runs/x


class FullFile:
    """An open file that takes a few bytes, then fails as on a full disk."""

    def __init__(self, file) -> None:
        self.file = file

    def __enter__(self) -> FullFile:
        return self

    def __exit__(self, *exc_info) -> None:
        self.file.close()

    def write(self, data: str) -> int:
        self.file.write(data[:10])
        self.file.flush()
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_lock_that_does_not_fit_without_hard_links_leaves_no_partial_lock(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()  # the user's: it stays

    def no_hard_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "link", no_hard_links)
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullFile(real_fdopen(fd, mode)))
    with pytest.raises(DiskFullError) as info:
        lock.acquire(run_dir)
    assert_one_line_naming(info.value, run_dir / "lock.json")
    assert list(tmp_path.iterdir()) == [run_dir] and list(run_dir.iterdir()) == []


def test_train_py_on_a_disk_full_when_locking_prints_the_one_line(tmp_path):
    # As typed: `python train.py trainer=cpu`, its run directory outputs/<date>/<time>-... (the
    # lock is taken as that is chosen, before Hydra writes there).
    wrapper = tmp_path / "full_when_locking.py"
    wrapper.write_text(FULL_WHEN_LOCKING)
    result = run_cli(
        [sys.executable, str(wrapper), str(REPO_ROOT / "train.py"), "trainer=cpu"],
        cwd=tmp_path,
        expect_success=False,
    )
    assert result.returncode == 1, result.stderr[-3000:]  # as for a full disk later in a run
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.stderr.rstrip().endswith(line)
    assert line.startswith("error: no space left on device writing outputs/")
    assert line.split(" writing ")[1].split(":")[0].endswith("/lock.json")
    assert "Free some space, or write to another disk" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [wrapper.name]  # no outputs/, no .tmp
