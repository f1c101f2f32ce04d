"""hydra/sweeper=optuna: a search over hyperparameters, its record, and its summary."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from tests.conftest import FAST
from vae_experiments.cli import train as train_cli
from vae_experiments.cli.search import objective, split_arguments
from vae_experiments.cli.summarize import main as summarize
from vae_experiments.runs import read_status
from vae_experiments.runs.records import find_run_dirs
from vae_experiments.targets import ConfigError

optuna = pytest.importorskip("optuna")


def test_search_arguments_become_distributions():
    searched, fixed, typed = split_arguments(
        [
            "model.beta=interval(0.5,8)",
            "optimizer.lr=tag(log, interval(1e-4,1e-2))",
            "model.latent_dim=int(interval(2,16))",
            "model=ae,vae",
            "model.k=range(1,10,4)",
            "trainer.max_epochs=3",
        ]
    )
    d = optuna.distributions
    assert searched["model.beta"] == d.FloatDistribution(0.5, 8.0)
    assert searched["optimizer.lr"] == d.FloatDistribution(1e-4, 1e-2, log=True)
    assert searched["model.latent_dim"] == d.IntDistribution(2, 16)
    assert searched["model"] == d.CategoricalDistribution(["ae", "vae"])
    assert searched["model.k"] == d.IntDistribution(1, 9, step=4)
    assert fixed == ["trainer.max_epochs=3"]
    assert typed["optimizer.lr"] == "tag(log, interval(1e-4,1e-2))"


def _search(monkeypatch, sweep_dir, storage, n_trials):
    args = [*FAST, "model/network=mlp", "model.network.hidden_dims=[16]", "logger=none"]
    args += ["trainer.max_epochs=1", "+trainer.limit_train_batches=2"]
    args += ["+trainer.limit_val_batches=1", "callbacks.latent_samples.enabled=false"]
    # The sampler's first draws with seed 2 (Optuna's random start-up): latent_dim 0, 2, 2, 2.
    args += ["model.beta=interval(0.5,8)", "model.latent_dim=choice(2,0)"]
    args += ["hydra/sweeper=optuna", f"hydra.sweeper.n_trials={n_trials}", "hydra.sweeper.seed=2"]
    args += [f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={sweep_dir}"]
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", *args])
    train_cli.main()
    return yaml.safe_load((sweep_dir / "search.yaml").read_text())


def test_a_search_finds_the_best_run_goes_on_after_a_failure_and_resumes(
    tmp_path, monkeypatch, capsys
):
    storage = f"sqlite:///{tmp_path}/search.db"
    search = _search(monkeypatch, tmp_path / "a", storage, n_trials=3)
    assert search["optimized_metric"] == "val/loss" and search["direction"] == "minimize"
    assert [t["state"] for t in search["trials"]] == ["fail", "complete", "complete"]
    assert search["trials"][0]["params"]["model.latent_dim"] == "0"
    runs = find_run_dirs(tmp_path / "a")
    assert len(runs) == 3
    failed = [r for r in runs if read_status(r)["status"] == "failed"]
    assert len(failed) == 1 and "latent_dim" in read_status(failed[0])["error"]
    # The best trial is the run with the lowest val/loss in its own metrics.json.
    losses = {
        r.name: json.loads((r / "metrics.json").read_text())["val/loss"]
        for r in runs
        if r not in failed
    }
    best_run = min(losses, key=losses.get)
    assert search["best"]["value"] == pytest.approx(losses[best_run])
    assert best_run.startswith(f"{search['best']['trial']}-") or best_run == str(
        search["best"]["trial"]
    )

    capsys.readouterr()
    assert summarize([str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert f"best trial: {best_run} (val/loss=" in out
    assert "best config: python train.py" in out and "model.beta=" in out
    assert (tmp_path / "a" / "summary_search.png").is_file()

    # The study lives in the storage: the same command with more trials runs only the missing one.
    resumed = _search(monkeypatch, tmp_path / "b", storage, n_trials=4)
    assert len(resumed["trials"]) == 4 and len(find_run_dirs(tmp_path / "b")) == 1


def test_the_direction_follows_the_metric_and_a_contrary_one_is_refused():
    assert objective("val/elbo", "auto", ["model.beta"]) == ("maximize", [])
    assert objective("val/loss", "auto", ["optimizer.lr"]) == ("minimize", [])
    assert objective(None, "auto", []) == ("minimize", [])  # train.yaml's default, val/loss
    assert objective("val/elbo", "maximize", []) == ("maximize", [])
    with pytest.raises(ConfigError, match=r"direction=minimize is invalid: val/elbo is better "):
        objective("val/elbo", "minimize", [])
    direction, (warning,) = objective("val/my_metric", "auto", [])
    assert direction == "minimize" and "hydra.sweeper.direction=maximize" in warning


def test_a_test_metric_or_a_loss_that_contains_the_searched_beta_is_warned_about():
    direction, (warning,) = objective("test/elbo", "auto", ["optimizer.lr"])
    assert direction == "maximize"
    assert "chooses trials on the test split" in warning and "optimized_metric=val/elbo" in warning
    _, (warning,) = objective("val/loss", "auto", ["model.beta", "optimizer.lr"])
    assert "changes with the searched model.beta itself" in warning and "val/elbo" in warning
    _, warnings = objective("test/loss", "auto", ["model.k"])
    assert len(warnings) == 2


def test_a_search_on_val_elbo_maximises_it(tmp_path, monkeypatch):
    args = [*FAST, "model/network=mlp", "model.network.hidden_dims=[16]", "logger=none"]
    args += ["trainer.max_epochs=1", "+trainer.limit_train_batches=2"]
    args += ["+trainer.limit_val_batches=1", "callbacks.latent_samples.enabled=false"]
    args += ["model.beta=interval(0.5,8)", "optimized_metric=val/elbo"]
    args += ["hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", *args])
    train_cli.main()
    search = yaml.safe_load((tmp_path / "search.yaml").read_text())
    assert search["optimized_metric"] == "val/elbo" and search["direction"] == "maximize"
    elbos = [
        json.loads((r / "metrics.json").read_text())["val/elbo"] for r in find_run_dirs(tmp_path)
    ]
    assert search["best"]["value"] == pytest.approx(max(elbos))
