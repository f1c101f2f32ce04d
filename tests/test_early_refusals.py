"""Mistakes that a command finds before it works: one ``error:`` line naming the key, the value
and the fix, exit status 2, no traceback, and nothing left on disk that blocks the corrected
command, which then works. Run as a user runs them, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from vae_experiments.config_checks import mlflow_store, unwritable_reason

# One short epoch of a small MLP model: the corrected commands take seconds.
QUICK = [
    "model/network=mlp",
    "model.network.hidden_dims=[16]",
    "trainer=cpu",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python <script> <args>`` in ``cwd``, as a user types it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def refused(result: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a command that must have refused with exit status 2."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ------------------------------------------------------------------------------------------------
# An MLflow store that cannot be written


@pytest.mark.parametrize(
    ("store", "expected"),
    [
        ("sqlite:///outputs/mlflow.db", ("outputs/mlflow.db", True)),
        ("sqlite:////abs/mlflow.db", ("/abs/mlflow.db", True)),
        ("sqlite:////abs/mlflow.db?timeout=5", ("/abs/mlflow.db", True)),
        ("sqlite://", None),
        ("sqlite:///:memory:", None),
        ("file:///abs/mlruns", ("/abs/mlruns", False)),
        ("mlruns", ("mlruns", False)),
        ("/abs/mlruns", ("/abs/mlruns", False)),
        ("http://host:5000", None),
        ("https://host", None),
        ("postgresql://user@host/db", None),
        ("databricks", None),
        ("", None),
    ],
)
def test_mlflow_store_is_the_local_file_or_folder_of_a_tracking_uri(
    store, expected, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # a relative store is taken from the working directory
    found = mlflow_store(store)
    if expected is None:
        assert found is None
    else:
        assert found == (tmp_path / expected[0], expected[1])


def test_unwritable_reason_names_what_cannot_be_written(tmp_path):
    (tmp_path / "a_file").write_text("")
    assert unwritable_reason(tmp_path / "new" / "deeper" / "mlflow.db", True) is None
    assert unwritable_reason(tmp_path / "a_file", True) is None  # an existing database
    assert "is a file, not a folder" in unwritable_reason(tmp_path / "a_file" / "m.db", True)
    assert "is a folder, not a file" in unwritable_reason(tmp_path, True)
    assert list(tmp_path.iterdir()) == [tmp_path / "a_file"]  # the check leaves nothing
    if sys.platform.startswith("linux"):  # no one, root neither, creates files in /proc
        assert "no file can be created in /proc" in unwritable_reason(Path("/proc/m.db"), True)
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root writes into read-only folders
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o555)
        try:
            reason = unwritable_reason(read_only / "mlflow.db", True)
            assert reason == f"no file can be created in {read_only} (Permission denied)"
        finally:
            read_only.chmod(0o755)


def refuse_mlflow_store(tmp_path: Path, database: Path, command: list[str]) -> None:
    """Runs ``train.py`` with ``database`` as MLflow's store and asserts the refusal."""
    before = files_under(tmp_path)
    result = run(
        "train.py", [*command, f"logger.mlflow.tracking_uri=sqlite:///{database}"], tmp_path
    )
    error = refused(result)
    assert error.startswith(f"error: logger.mlflow.tracking_uri=sqlite:///{database} is invalid")
    assert str(database) in error and "logger.mlflow.tracking_uri=http://host:5000" in error
    assert files_under(tmp_path) == before  # no run folder, no outputs/, no database


@pytest.mark.parametrize("where", ["below a file", "in /proc", "read-only folder"])
def test_an_mlflow_store_that_cannot_be_written_is_refused_before_training(where, tmp_path):
    pytest.importorskip("mlflow")
    if where == "in /proc" and not sys.platform.startswith("linux"):
        pytest.skip("/proc is Linux's")
    if where == "read-only folder" and (not hasattr(os, "geteuid") or os.geteuid() == 0):
        pytest.skip("root writes into read-only folders")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "read_only").mkdir(mode=0o555)
    database = {
        "below a file": tmp_path / "a_file" / "mlflow.db",
        "in /proc": Path("/proc/mlflow.db"),
        "read-only folder": tmp_path / "read_only" / "mlflow.db",
    }[where]
    refuse_mlflow_store(tmp_path, database, ["logger=mlflow", "hydra.run.dir=runs/tracked"])


@pytest.mark.slow  # MLflow creates its database: ~30 s on two loaded cores
def test_the_corrected_mlflow_store_then_trains_into_the_same_folder(tmp_path):
    pytest.importorskip("mlflow")
    (tmp_path / "a_file").write_text("")
    command = ["logger=mlflow", *QUICK, "hydra.run.dir=runs/tracked"]
    refuse_mlflow_store(tmp_path, tmp_path / "a_file" / "mlflow.db", command)
    good = f"sqlite:///{tmp_path}/store/mlflow.db"
    result = run("train.py", [*command, f"logger.mlflow.tracking_uri={good}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "runs" / "tracked" / "metrics.json").is_file()
    assert (tmp_path / "store" / "mlflow.db").is_file()
