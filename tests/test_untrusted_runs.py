"""A run directory may come from someone else: loading or resuming it builds only classes we
ship, so a config naming ``torch.hub.load`` (with a ``hubconf.py`` beside it), ``os.system`` or
``builtins.eval`` is refused with its key, and no code of the run's runs. A checkpoint that is
not ours (a pickle holding ``os.system``, torch's legacy format) is not loaded, and the four
commands that read one say what it is in one ``error:`` line."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import MLP_64, REPO_ROOT
from tests.test_cli import run_cli
from vae_experiments.runs import load_run
from vae_experiments.runs.load import UnreadableCheckpointError, check_checkpoint, read_checkpoint
from vae_experiments.targets import ConfigError

HOSTILE = {
    "torch.hub.load": {"repo_or_dir": "{run}", "model": "payload", "source": "local"},
    "os.system": {"command": "touch {marker}"},
    "builtins.eval": {"source": "open({marker!r}, 'w')"},
}


def hostile_copy(run, tmp_path, target: str, node: str = "model"):
    """A copy of a trained run whose config names ``target`` at ``node``, and the marker file
    that the target's code would create."""
    copy = shutil.copytree(run, tmp_path / "shared_run")
    marker = tmp_path / "marker"
    (copy / "hubconf.py").write_text(f"def payload():\n    open({str(marker)!r}, 'w').close()\n")
    config = yaml.safe_load((copy / "config.yaml").read_text())
    arguments = {
        key: value.format(run=copy, marker=str(marker)) if isinstance(value, str) else value
        for key, value in HOSTILE[target].items()
    }
    config[node] = {"_target_": target, **arguments}
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    return copy, marker


@pytest.mark.parametrize("target", sorted(HOSTILE))
@pytest.mark.parametrize("node", ["model", "data"])
def test_load_run_refuses_foreign_targets(trained_runs, tmp_path, target, node):
    run, marker = hostile_copy(trained_runs("vae"), tmp_path, target, node)
    with pytest.raises(ConfigError, match=rf"^{node}\._target_={target} is invalid: not a target"):
        model, cfg = load_run(run)
        from vae_experiments.runs import load_data

        load_data(cfg)
    assert not marker.exists()


def test_resume_refuses_a_foreign_target_before_touching_the_run(trained_runs, tmp_path):
    run, marker = hostile_copy(trained_runs("vae"), tmp_path, "torch.hub.load")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    result = run_cli(
        [sys.executable, str(REPO_ROOT / "train.py"), f"resume={run}", "trainer.max_epochs=9"],
        cwd=tmp_path,
        expect_success=False,
    )
    assert result.returncode != 0
    assert "model._target_=torch.hub.load is invalid: not a target" in result.stderr
    assert not marker.exists()
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name != "train.log"}
    assert after == before  # nothing written but the log of the refused attempt


# --- checkpoints that are not ours -------------------------------------------------------------


class RunsCode:
    """Unpickled, it would run ``touch <marker>`` (os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


SYSTEM = f"{os.system.__module__}.system"  # posix.system


def write_foreign(path: Path, kind: str, marker: Path) -> Path:
    """A file given as a checkpoint that is not ours, of one ``kind``."""
    weights = {"state_dict": {"model.w": torch.ones(2)}, "epoch": 1, "global_step": 3}
    if kind == "zip_with_code":  # torch.save's own format, a global that is no tensor inside
        torch.save({**weights, "callbacks": RunsCode(marker)}, path)
    elif kind == "legacy":
        torch.save(weights, path, _use_new_zipfile_serialization=False)
    elif kind == "legacy_with_code":
        torch.save({"x": RunsCode(marker)}, path, _use_new_zipfile_serialization=False)
    elif kind == "pickle_with_code":  # protocol 4 names its globals with STACK_GLOBAL
        path.write_bytes(pickle.dumps({"state_dict": RunsCode(marker)}, protocol=4))
    elif kind == "html":
        path.write_bytes(b"<!DOCTYPE html><html>403 Forbidden</html>")
    else:
        raise ValueError(kind)
    return path


FOREIGN = {
    "zip_with_code": f"it holds objects that are not tensors ({SYSTEM}); it was not loaded, so "
    "nothing in it ran: do not trust this file. ",
    "legacy": "it is in torch's legacy format (a pickle, not the zip archive torch.save writes "
    "since torch 1.6); it was not loaded. ",
    "legacy_with_code": "it is in torch's legacy format (a pickle, not the zip archive "
    f"torch.save writes since torch 1.6), and holds objects that are not tensors ({SYSTEM}); "
    "it was not loaded, so nothing in it ran: do not trust this file. ",
    "pickle_with_code": "it is a plain pickle, not a torch checkpoint, and holds objects that "
    f"are not tensors ({SYSTEM}); it was not loaded, so nothing in it ran",
    "html": "it is neither a zip archive (what torch.save writes) nor a pickle; it starts with "
    "b'<!DOCTYPE html><'; it was not loaded. ",
}


@pytest.mark.parametrize("kind", sorted(FOREIGN))
def test_a_checkpoint_that_is_not_ours_is_named_for_what_it_is(tmp_path, kind):
    marker = tmp_path / "marker"
    path = write_foreign(tmp_path / "x.ckpt", kind, marker)
    for read in (read_checkpoint, check_checkpoint):
        with pytest.raises(UnreadableCheckpointError) as info:
            read(path)
        message = str(info.value)
        assert message.startswith(f"{path} is no checkpoint of vae-experiments: {FOREIGN[kind]}")
        assert message.endswith(
            "Give a checkpoint that a training run wrote "
            "(<run dir>/checkpoints/last.ckpt or best.ckpt)"
        )
        assert "\n" not in message and "weights_only" not in message and "full disk" not in message
        assert not info.value.damaged
    assert not marker.exists()


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (
            "cut_short",
            "it is cut short: its zip archive has no end (truncated by a full disk or "
            "a killed copy?)",
        ),
        ("empty", "it is empty (0 bytes: a full disk or a killed copy?)"),
    ],
)
def test_a_checkpoint_cut_short_says_so_and_names_one_that_loads(
    trained_runs, tmp_path, damage, problem
):
    run = shutil.copytree(trained_runs("vae"), tmp_path / "run")
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(
        last.read_bytes()[: len(last.read_bytes()) // 2] if damage == "cut_short" else b""
    )
    with pytest.raises(UnreadableCheckpointError) as info:
        read_checkpoint(last)
    assert str(info.value) == f"{last} cannot be read: {problem}" and info.value.damaged
    with pytest.raises(UnreadableCheckpointError, match="continue from it with resume=.*best.ckpt"):
        check_checkpoint(last)


def test_our_checkpoints_load(trained_runs):
    state = read_checkpoint(trained_runs("vae") / "checkpoints" / "last.ckpt", mmap=True)
    assert state["epoch"] >= 0 and any(key.startswith("model.") for key in state["state_dict"])


def fingerprint(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def with_foreign_last_ckpt(trained_runs, tmp_path) -> tuple[Path, Path, Path]:
    """A copy of a trained run whose last.ckpt is a pickle holding os.system; the marker file
    it would create."""
    run = shutil.copytree(trained_runs("vae"), tmp_path / "shared_run")
    marker = tmp_path / "marker"
    last = write_foreign(run / "checkpoints" / "last.ckpt", "zip_with_code", marker)
    return run, last, marker


COMMANDS = {
    "ckpt_path": lambda run, last, new: [
        "train.py",
        "trainer=cpu",
        "logger=none",
        *MLP_64,
        f"ckpt_path={last}",
        f"hydra.run.dir={new}",
    ],
    "resume": lambda run, last, new: ["train.py", f"resume={run}", "trainer.max_epochs=9"],
    "evaluate": lambda run, last, new: ["scripts/evaluate.py", f"run={last}"],
    "sample": lambda run, last, new: ["scripts/sample.py", f"run={last}"],
}


@pytest.mark.parametrize(
    "command",
    [
        "ckpt_path",
        pytest.param("resume", marks=pytest.mark.slow),  # the same check as ckpt_path=
        "evaluate",
        pytest.param("sample", marks=pytest.mark.slow),  # the same load_run as evaluate.py
    ],
)
def test_a_foreign_checkpoint_is_one_error_line_and_changes_nothing(
    trained_runs, tmp_path, command
):
    run, last, marker = with_foreign_last_ckpt(trained_runs, tmp_path)
    before = fingerprint(run)
    script, *args = COMMANDS[command](run, last, tmp_path / "new")
    result = run_cli(
        [sys.executable, str(REPO_ROOT / script), *args], cwd=tmp_path, expect_success=False
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "weights_only" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {last} is no checkpoint of vae-experiments: {FOREIGN['zip_with_code']}"
        "Give a checkpoint that a training run wrote (<run dir>/checkpoints/"
        "last.ckpt or best.ckpt)"
    ]
    assert result.stderr.rstrip().endswith(errors[0])
    assert not marker.exists()
    assert fingerprint(run) == before and not (run / "analysis").exists()
    assert not (tmp_path / "new").exists()
