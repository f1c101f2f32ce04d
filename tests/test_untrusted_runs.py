"""A run directory may come from someone else: loading or resuming it builds only classes we
ship, so a config naming ``torch.hub.load`` (with a ``hubconf.py`` beside it), ``os.system`` or
``builtins.eval`` is refused with its key, and no code of the run's runs."""

from __future__ import annotations

import shutil
import sys

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.test_cli import run_cli
from vae_experiments.runs import load_run
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
