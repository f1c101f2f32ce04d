"""The package as users get it: a non-editable install runs from any directory, and loading a
run for analysis needs neither Lightning nor Hydra."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

#: Top-level modules that the analysis side must not pull in.
TRAINING_ONLY = ("pytorch_lightning", "lightning", "lightning_fabric", "hydra")


def _run(command: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result


def test_loading_a_run_imports_neither_lightning_nor_hydra(trained_runs, tmp_path):
    run = trained_runs("vae")
    code = textwrap.dedent(
        f"""
        import sys
        import vae_experiments.analysis
        from vae_experiments.runs import iterate_split, load_data, load_run

        model, cfg = load_run({str(run)!r})
        data = load_data(cfg)
        count = sum(len(x) for x, _ in iterate_split(data, "test"))
        terms = model.loss(next(iter(iterate_split(data, "test")))[0])
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {TRAINING_ONLY!r})
        print(count, float(terms["loss"]), loaded)
        assert not loaded, loaded
        """
    )
    result = _run([sys.executable, "-c", code], cwd=REPO_ROOT)
    count, loss, _ = result.stdout.split(maxsplit=2)
    assert int(count) == 359 and float(loss) > 0


def _has_modern_setuptools() -> bool:
    """Whether the running environment's setuptools builds our pyproject.toml (PEP 639)."""
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


def _make_venv_seeing_this_environment(venv: Path, cwd: Path) -> Path:
    """A fresh venv at ``venv`` whose interpreter sees the running environment's packages (torch,
    Lightning, Hydra: no download) after its own; returns its ``python``.

    ``venv --system-site-packages`` is not enough: run from inside a virtualenv it gives the *base*
    interpreter's site-packages (an old setuptools, no torch), not the virtualenv's. So the new
    venv gets no system packages and a ``.pth`` file naming this environment's site-packages
    folders: plain path entries, so their own ``.pth`` files (an editable install's finder of
    /work's clone) are not run, and the venv's copy of vae-experiments is the one imported.
    """
    # --without-pip: the venv would get its own (older) pip and setuptools, which would shadow
    # the ones of this environment that know our pyproject.toml.
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=cwd)
    python = venv / "bin" / "python"
    venv_site = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=cwd
    ).stdout.strip()
    ours = [sysconfig.get_paths()[name] for name in ("purelib", "platlib")]
    ours += [path for path in site.getsitepackages() if path not in ours]
    (Path(venv_site) / "_outer_environment.pth").write_text(
        "".join(f"{path}\n" for path in dict.fromkeys(ours) if Path(path).is_dir())
    )
    return python


def test_a_plain_pip_install_trains_from_another_directory(tmp_path):
    """``pip install .`` (not editable) into a fresh venv: ``vae-train`` finds its configs."""
    source = tmp_path / "source"
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if (REPO_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, source / name)
    venv = tmp_path / "venv"
    # The venv sees this environment's torch, Lightning and Hydra (no download), but gets its
    # own copy of vae-experiments, built as a wheel.
    python = _make_venv_seeing_this_environment(venv, tmp_path)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--no-deps"]
    if _has_modern_setuptools():
        pip.append("--no-build-isolation")
    _run([*pip, str(source)], cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(
        [str(python), "-c", "import vae_experiments; print(vae_experiments.__file__)"],
        cwd=elsewhere,
    ).stdout.strip()
    assert Path(where).is_relative_to(venv), where

    _run(
        [
            str(venv / "bin" / "vae-train"),
            "trainer.max_epochs=1",
            "logger=none",
            "hydra.run.dir=run",
        ],
        cwd=elsewhere,
    )
    metrics = json.loads((elsewhere / "run" / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["test/elbo"] < 0
    help_text = _run([str(venv / "bin" / "vae-evaluate"), "--help"], cwd=elsewhere).stdout
    assert "evaluate" in help_text


@pytest.mark.parametrize(
    "command",
    [
        "vae-train",
        "vae-evaluate",
        "vae-sample",
        "vae-fit-prior",
        "vae-compare-pca",
        "vae-summarize",
    ],
)
def test_every_command_has_a_console_script(command):
    assert shutil.which(command) or (Path(sys.executable).parent / command).exists(), (
        f"{command} is not installed: pip install -e . again after changing pyproject.toml"
    )
