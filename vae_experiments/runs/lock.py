"""One run, one writer: the lock file of a run directory.

A command that writes a run directory (a new run, a resumed one) holds ``lock.json`` there for
its whole life::

    {"pid": 4242, "host": "node17", "started": "2026-05-01T09:00:00+00:00",
     "command": "train.py model=vae", "slurm_job_id": "123", "slurm_restart_count": 0}

The file is written aside and hard-linked into place, which fails when a lock is already there
(``O_CREAT | O_EXCL`` where the filesystem has no hard links): of two commands only one takes it,
and no one reads a half-written lock. It is removed when the command ends, normally, by an
exception (a signal that interrupts training is one) or at interpreter exit. Only a process that
was killed outright (SIGKILL, a power loss, a node that went down) leaves it behind:

- its pid is dead on this host: the lock is stale; the next command says so and takes it over
  (the stale file is renamed away first, so of two takers only one removes it);
- it was taken on another host: its pid cannot be checked from here, so the command is refused
  and told how to remove it; except the lock of this very SLURM job before it was requeued
  (same ``SLURM_JOB_ID``, lower ``SLURM_RESTART_COUNT``), which the requeued job takes over.

A lock remembers what the directory held when it was taken, so that a command that stops on a
config mistake removes what it wrote and nothing else (:meth:`RunLock.discard`).

Plain Python: no torch, Lightning or Hydra.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import shlex
import shutil
import socket
import sys
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from vae_experiments.runs.layout import (
    CHECKPOINT_DIR,
    HPC_CHECKPOINT_GLOB,
    HYDRA_DIR,
    LOCK_FILE,
    LOG_FILE,
    STATUS_FILE,
)

log = logging.getLogger(__name__)

#: Files a command writes into an existing run directory before it trains: what
#: :meth:`RunLock.discard` removes when the command stopped on a config mistake.
EARLY_FILES = (HYDRA_DIR, LOG_FILE, STATUS_FILE)


class RunLocked(RuntimeError):
    """The run directory's lock is held by another process (or may be: one on another host).
    The message is one line naming the directory, the holder and what to do."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a run directory's lock: the content of ``lock.json``."""

    pid: int
    host: str
    started: str
    command: str
    slurm_job_id: str | None = None
    slurm_restart_count: int = 0

    @classmethod
    def this_process(cls) -> LockHolder:
        """The holder that this process writes."""
        return cls(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            command=shlex.join(sys.argv),
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            slurm_restart_count=_slurm_restart_count(),
        )

    def describe(self) -> str:
        """``pid 4242 on node17 (since <time>: <command>)``."""
        return f"pid {self.pid} on {self.host} (since {self.started}: {self.command})"


def _slurm_restart_count() -> int:
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (one of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_holder(run_dir: str | Path) -> LockHolder | None:
    """The holder of ``run_dir``'s lock; None when there is no lock.

    Raises:
        RunLocked: the lock file cannot be read as a lock.
    """
    path = Path(run_dir) / LOCK_FILE
    try:
        return _parse(path.read_text(), path)
    except FileNotFoundError:
        return None


def _parse(text: str, path: Path) -> LockHolder:
    try:
        return LockHolder(**json.loads(text))
    except (ValueError, TypeError) as error:
        raise RunLocked(
            f"{path} is no lock this program wrote ({error}); if no run writes {path.parent}, "
            f"delete {path} and run again"
        ) from None


def process_alive(pid: int, host: str) -> bool | None:
    """Whether process ``pid`` of ``host`` still runs; None for another host, where this cannot
    be told from here."""
    if host != socket.gethostname():
        return None
    return _pid_alive(pid)


def writer_alive(run_dir: str | Path) -> bool | None:
    """Whether a live process holds ``run_dir``'s lock: True; False when there is no lock or its
    pid is dead on this host (a killed run); None when it was taken on another host (or cannot
    be read), where this cannot be told."""
    try:
        holder = read_holder(run_dir)
    except RunLocked:
        return None
    if holder is None:
        return False
    return process_alive(holder.pid, holder.host)


def missing_dirs(path: str | Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, outermost first: what creating
    ``path`` creates."""
    missing = []
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing[::-1]


@dataclass(frozen=True)
class _Snapshot:
    """What a run directory held when its lock was taken."""

    entries: frozenset[str]  # top-level names, the lock file not among them
    log_size: int | None  # train.log's size, None if there was none
    status: bytes | None  # status.json's content, None if there was none
    checkpoints: dict[str, tuple[int, int]]  # checkpoint file -> (mtime_ns, size)

    @classmethod
    def of(cls, run_dir: Path) -> _Snapshot:
        entries = {p.name for p in run_dir.iterdir()} - {LOCK_FILE} if run_dir.is_dir() else set()
        log_file, status_file = run_dir / LOG_FILE, run_dir / STATUS_FILE
        return cls(
            entries=frozenset(entries),
            log_size=log_file.stat().st_size if log_file.is_file() else None,
            status=status_file.read_bytes() if status_file.is_file() else None,
            checkpoints=_checkpoint_files(run_dir),
        )


def _checkpoint_files(run_dir: Path) -> dict[str, tuple[int, int]]:
    files = [*(run_dir / CHECKPOINT_DIR).glob("*"), *run_dir.glob(HPC_CHECKPOINT_GLOB)]
    state = {}
    for path in files:
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        state[str(path.relative_to(run_dir))] = (stat.st_mtime_ns, stat.st_size)
    return state


# The locks this process holds, by resolved directory: a command takes its run directory's lock
# as early as it can, and each later step that asks for it gets the same lock.
_HELD: dict[Path, RunLock] = {}


class RunLock:
    """This process's lock of a run directory; use :func:`acquire` to take one.

    Attributes:
        run_dir: the run directory.
        holder: what ``lock.json`` says.
        created: the directories that this command created for the run (outermost first, the
            run directory last): :meth:`discard` removes them.
    """

    def __init__(
        self, run_dir: Path, holder: LockHolder, created: Sequence[Path], snapshot: _Snapshot
    ) -> None:
        self.run_dir = run_dir
        self.holder = holder
        self.created = list(created)
        self._snapshot = snapshot
        self._text = json.dumps(asdict(holder), indent=2, sort_keys=True) + "\n"

    @property
    def path(self) -> Path:
        """The lock file."""
        return self.run_dir / LOCK_FILE

    def release(self) -> None:
        """Removes the lock file (if it is still this lock's; a forked child removes nothing)."""
        if os.getpid() != self.holder.pid:
            return
        _HELD.pop(self.run_dir.resolve(), None)
        try:
            if self.path.read_text() == self._text:
                self.path.unlink()
        except FileNotFoundError:
            pass

    def wrote_checkpoints(self) -> bool:
        """Whether a checkpoint was written (or changed) since the lock was taken."""
        return _checkpoint_files(self.run_dir) != self._snapshot.checkpoints

    def discard(self, written: Sequence[str] = EARLY_FILES) -> None:
        """Undoes what this command wrote, then releases the lock: for a command that stopped
        on a config mistake, before it trained.

        A run directory that this command created goes, with the parents it created (if
        empty). In one that existed, only what the command wrote before training goes
        (``written``: ``.hydra/``, ``train.log``, ``status.json`` where they were not there
        before; another command names its own log); a ``status.json`` that was there gets its
        content back and ``train.log`` its length. Nothing else that was there is touched.
        """
        if os.getpid() != self.holder.pid:
            return
        snapshot = self._snapshot
        if self.created and self.created[-1] == self.run_dir.absolute():
            shutil.rmtree(self.run_dir, ignore_errors=True)
            for directory in reversed(self.created[:-1]):
                try:
                    directory.rmdir()
                except OSError:  # not empty: another run uses it now
                    break
            _HELD.pop(self.run_dir.resolve(), None)
            return
        for name in written:
            path = self.run_dir / name
            if name in snapshot.entries:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        status = self.run_dir / STATUS_FILE
        if snapshot.status is not None and status.read_bytes() != snapshot.status:
            # Imported here: files.py imports OmegaConf, which the lock does not need.
            from vae_experiments.runs.files import atomic_write

            with atomic_write(status, "wb") as f:
                f.write(snapshot.status)
        log_file = self.run_dir / LOG_FILE
        if snapshot.log_size is not None and log_file.is_file():
            # Only this command's lines are cut: the log was that long when the lock was taken.
            with contextlib.suppress(OSError):
                os.truncate(log_file, min(log_file.stat().st_size, snapshot.log_size))
        self.release()


def acquire(run_dir: str | Path, created: Sequence[Path] = ()) -> RunLock:
    """Takes ``run_dir``'s lock for this process, for the rest of its life (or until
    :meth:`RunLock.release`); the lock this process holds already, if it does.

    Args:
        run_dir: the run directory; created if missing.
        created: the directories the caller created for the run (:func:`missing_dirs`), which
            :meth:`RunLock.discard` removes again.

    Raises:
        RunLocked: a live process on this host holds it, or a process on another host does
            (which cannot be checked from here), or the lock file is no lock.
        DiskFullError: the lock cannot be written, its filesystem (or quota) is full: one line
            naming the file and the free space (:mod:`vae_experiments.runs.files`). Nothing is
            left behind: no temporary file, and none of the directories created for the run.
    """
    run_dir = Path(run_dir)
    held = _HELD.get(run_dir.resolve())
    if held is not None:
        return held
    created = [*created, *missing_dirs(run_dir)]
    snapshot = _Snapshot.of(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir, LockHolder.this_process(), created, snapshot)
    try:
        return _take(lock)
    except OSError:  # not written (a full disk): the directories made for the run go (if empty)
        for directory in reversed(created):
            try:
                directory.rmdir()
            except OSError:
                break
        raise


def _take(lock: RunLock) -> RunLock:
    """Writes ``lock``'s file, taking over a stale one; see :func:`acquire`."""
    run_dir = lock.run_dir
    for _ in range(10):
        if _create(lock.path, lock._text):
            _register_release_at_exit()
            _HELD[run_dir.resolve()] = lock
            return lock
        try:
            text = lock.path.read_text()
        except FileNotFoundError:
            continue  # released in the meantime
        holder = _parse(text, lock.path)
        _refuse_unless_stale(run_dir, holder)
        log.warning(
            "%s: taking over the lock of %s, which is no longer running (it was killed or its "
            "machine went down)",
            run_dir,
            holder.describe(),
        )
        _remove_if_unchanged(lock.path, text)
    raise RunLocked(f"{lock.path} keeps changing: another command is taking it; try again")


def _refuse_unless_stale(run_dir: Path, holder: LockHolder) -> None:
    """Raises RunLocked unless ``holder`` is a process that is gone."""
    this_host = socket.gethostname()
    job = os.environ.get("SLURM_JOB_ID")
    requeued = _slurm_restart_count() > holder.slurm_restart_count
    if job is not None and holder.slurm_job_id == job and requeued:
        return  # this job before SLURM requeued it: SLURM stopped it before the requeue
    if holder.host == this_host:
        if holder.pid == os.getpid() or not _pid_alive(holder.pid):
            return  # a dead process (its pid may be ours now)
        raise RunLocked(
            f"{run_dir} is in use by another run: {holder.describe()}; one run writes a "
            "directory at a time: wait until it ends, or stop it first"
        )
    raise RunLocked(
        f"{run_dir} is locked by {holder.describe()}, which cannot be checked from {this_host}; "
        f"if that run is gone, delete {run_dir / LOCK_FILE} and run again"
    )


def _create(path: Path, text: str) -> bool:
    """Creates ``path`` holding ``text`` if it does not exist, atomically; False if it exists.

    Raises:
        DiskFullError: the filesystem or quota is full; neither the temporary file nor a
            partial ``path`` is left.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links (a full one fails below as well)
            pass
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
        except BaseException:
            path.unlink(missing_ok=True)  # a partial lock would read as no lock at all
            raise
        return True
    except OSError as error:
        # Imported here: files.py imports OmegaConf, which the lock does not need.
        from vae_experiments.runs.files import disk_full_error

        full = disk_full_error(path, error)
        if full is not None and full is not error:
            raise full from None  # the one line says it all
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _remove_if_unchanged(path: Path, text: str) -> None:
    """Removes the lock file ``path`` if it still holds ``text``. It is renamed away first (of
    two processes, one succeeds), and put back if it was a new lock taken in between."""
    aside = path.with_name(f".{path.name}.stale.{os.getpid()}.{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another process took it over first
    try:
        if aside.read_text() != text:
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
    finally:
        aside.unlink(missing_ok=True)


@functools.cache
def _register_release_at_exit() -> None:
    atexit.register(release_all)


def release_all() -> None:
    """Releases every lock this process holds (registered with atexit)."""
    for lock in list(_HELD.values()):
        lock.release()
