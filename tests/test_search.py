"""hydra/sweeper=optuna: a search over hyperparameters, its record, and its summary."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import FAST, REPO_ROOT
from vae_experiments.cli import run_dirs
from vae_experiments.cli import train as train_cli
from vae_experiments.cli.search import (
    OptunaSearch,
    objective,
    recover_interrupted,
    sampler_seed,
    split_arguments,
)
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


TRAIN_PY = str(REPO_ROOT / "train.py")
# A trial of a second or two: a small MLP VAE, two training batches and one validation batch.
TINY = [*FAST, "model/network=mlp", "model.network.hidden_dims=[16]", "logger=none"]
TINY += ["trainer.max_epochs=1", "+trainer.limit_train_batches=2"]
TINY += ["+trainer.limit_val_batches=1", "callbacks.latent_samples.enabled=false"]


def _search(monkeypatch, sweep_dir, storage, n_trials, searched=None, seed=2):
    # The sampler's first draws with seed 2 (Optuna's random start-up): latent_dim 0, 2, 2, 2.
    searched = searched or ["model.beta=interval(0.5,8)", "model.latent_dim=choice(2,0)"]
    args = [*TINY, *searched, "hydra/sweeper=optuna", f"hydra.sweeper.n_trials={n_trials}"]
    args += [f"hydra.sweeper.seed={seed}", f"hydra.sweeper.storage={storage}"]
    args += [f"hydra.sweep.dir={sweep_dir}"]
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
    assert resumed["trials"][3]["params"] != search["trials"][0]["params"]  # not drawn again


def test_the_same_search_again_continues_its_study_with_new_values(tmp_path, monkeypatch):
    storage, sweep_dir = f"sqlite:///{tmp_path}/search.db", tmp_path / "search"
    first = _search(monkeypatch, sweep_dir, storage, 2, ["model.beta=interval(0.5,8)"], seed=0)
    assert first["storage"] == storage
    # The same command with more trials, into the same sweep directory: the study goes on there,
    # and its sampler, seeded afresh by each command, does not draw the first values again.
    again = _search(monkeypatch, sweep_dir, storage, 4, ["model.beta=interval(0.5,8)"], seed=0)
    betas = [t["params"]["model.beta"] for t in again["trials"]]
    assert [t["state"] for t in again["trials"]] == ["complete"] * 4
    assert betas[:2] == [t["params"]["model.beta"] for t in first["trials"]]
    assert not set(betas[2:]) & set(betas[:2])
    assert len(find_run_dirs(sweep_dir)) == 4
    # A new study still draws what its seed draws, so a search can be repeated.
    assert sampler_seed(0, 0) == 0 and sampler_seed(0, 2) != sampler_seed(0, 3)


@pytest.mark.parametrize(
    "argument, message",
    [
        (
            "model.beta=interval(4,0.5)",
            "model.beta=interval(4,0.5) is invalid: its low end 4 is above its high end 0.5; "
            "write model.beta=interval(0.5,4)",
        ),
        (
            "optimizer.lr=tag(log, interval(0, 1))",
            "optimizer.lr=tag(log, interval(0, 1)) is invalid: a log scale needs a low end above "
            "0 (it has 0); start it above 0, e.g. optimizer.lr=tag(log, interval(0.0001,1)), or "
            "search it on a linear scale, optimizer.lr=interval(0,1)",
        ),
        (
            "model.latent_dim=int(tag(log, interval(0,16)))",
            "e.g. model.latent_dim=int(tag(log, interval(1,16)))",
        ),
        ("model.k=range(5,1)", "model.k=range(5,1) is invalid: it holds no value"),
        ("model.k=range(1,5,0)", "model.k=range(1,5,0) is invalid: its step is 0"),
    ],
)
def test_a_range_with_no_values_names_the_argument_and_the_fix(argument, message):
    with pytest.raises(ConfigError) as error:
        split_arguments([argument])
    assert message in str(error.value)


def test_a_bad_range_is_one_error_line_before_anything_is_written(tmp_path):
    sweep_dir, database = tmp_path / "searches" / "beta", tmp_path / "search.db"
    result = subprocess.run(
        [sys.executable, TRAIN_PY, "-m", "hydra/sweeper=optuna", "trainer=cpu"]
        + ["model.beta=interval(4,0.5)", f"hydra.sweeper.storage=sqlite:///{database}"]
        + [f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: model.beta=interval(4,0.5) is invalid: its low end 4 is above its high end 0.5; "
        "write model.beta=interval(0.5,4)"
    ]
    # No sweep directory (nor its parent, made for it) and no study: the corrected command runs.
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_search_directory_is_continued_only_by_its_own_search(tmp_path):
    sweep_dir = tmp_path / "search"
    (sweep_dir / "0-vae-digits-beta=1.2").mkdir(parents=True)
    (sweep_dir / "0-vae-digits-beta=1.2" / "status.json").write_text('{"status": "finished"}')
    record = {"study_name": "vae-search", "storage": "sqlite:///search.db", "trials": []}
    (sweep_dir / "search.yaml").write_text(yaml.safe_dump(record))
    given = f"hydra.sweep.dir={sweep_dir}"
    with pytest.raises(SystemExit, match="names the directory of a search .* Continue the search"):
        run_dirs.refuse_existing_run_dir(["-m", "model.beta=1,2", given])
    run_dirs.refuse_existing_run_dir(["-m", "hydra/sweeper=optuna", given])  # its own search
    # ... which must be the study that ran there, in the same storage.
    other = OptunaSearch(storage="sqlite:///other.db")
    with pytest.raises(ConfigError, match="study vae-search in sqlite:///search.db, not vae"):
        other._check_sweep_dir(sweep_dir)
    with pytest.raises(ConfigError, match="only from its stored study"):
        OptunaSearch(storage=None)._check_sweep_dir(sweep_dir)
    with pytest.raises(ConfigError, match="holds runs of trials up to 0, but study vae-search"):
        OptunaSearch(storage="sqlite:///search.db")._check_job_dirs(sweep_dir, trials=0)


def test_trials_left_running_by_a_process_that_is_gone_are_run_again():
    study = optuna.create_study()
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    owners = [
        {"pid": int(gone.stdout), "host": socket.gethostname()},  # killed
        {"pid": os.getpid(), "host": socket.gethostname()},  # still running here
        {"pid": 1, "host": "another-node"},  # running elsewhere: cannot be told
    ]
    space = {"model.beta": optuna.distributions.FloatDistribution(0.5, 8)}
    for owner in owners:
        study.ask(space).set_user_attr("process", owner)
    assert recover_interrupted(study) == [0]
    trials = study.trials
    assert trials[0].state.name == "FAIL" and trials[0].user_attrs["interrupted"] == "process gone"
    assert [t.state.name for t in trials[1:3]] == ["RUNNING", "RUNNING"]
    assert trials[3].state.name == "WAITING" and trials[3].user_attrs["rerun_of"] == 0
    assert recover_interrupted(study) == []  # queued once
    assert study.ask(space).params == trials[0].params


def _wait_for_a_file(pattern, directory, process, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not list(directory.glob(pattern)):
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"no {pattern} in {directory}"
        time.sleep(0.05)


@pytest.mark.slow  # two commands and three trials, one stopped by SIGTERM: ~20 s of CPU
def test_a_stopped_search_records_its_trial_and_its_hint_continues_it(tmp_path):
    sweep_dir, storage = tmp_path / "search", f"sqlite:///{tmp_path}/search.db"
    args = ["-m", *TINY, "model.beta=interval(0.5,8)", "hydra/sweeper=optuna"]
    args += ["hydra.sweeper.n_trials=2", f"hydra.sweeper.storage={storage}"]
    long_trial = "trainer.max_epochs=1000"  # stopped in its second epoch
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, TRAIN_PY, *args, long_trial, f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for_a_file("0-*/checkpoints/last.ckpt", sweep_dir, process)
        process.send_signal(signal.SIGTERM)
        out = process.communicate(timeout=120)[0]
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, out[-3000:]
    # The trial is interrupted, in the study and in search.yaml (not left running), ...
    search = yaml.safe_load((sweep_dir / "search.yaml").read_text())
    assert [(t["trial"], t["state"], t.get("interrupted")) for t in search["trials"]] == [
        (0, "interrupted", "SIGTERM")
    ]
    (trial,) = optuna.load_study(study_name="vae-search", storage=storage).trials
    assert trial.state.name == "FAIL" and trial.user_attrs["interrupted"] == "SIGTERM"
    # ... and the one hint is the search's command (not resume= of the trial's run).
    assert "resume=" not in out
    (hint,) = [line for line in out.splitlines() if "Continue the search with: " in line]
    command = shlex.split(hint.split("Continue the search with: ")[1].split(" (it runs")[0])
    assert command == ["python", "train.py", *args, long_trial, f"hydra.sweep.dir={sweep_dir}"]

    # That command (with a short trial this time) runs the interrupted trial's values again,
    # then the trial still missing, in the same sweep directory.
    command[command.index(long_trial)] = "trainer.max_epochs=1"
    done = subprocess.run(
        [sys.executable, TRAIN_PY, *command[2:]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    trials = yaml.safe_load((sweep_dir / "search.yaml").read_text())["trials"]
    assert [t["state"] for t in trials] == ["interrupted", "complete", "complete"]
    assert trials[1]["params"] == trials[0]["params"] and trials[1]["rerun_of"] == 0
    assert len(find_run_dirs(sweep_dir)) == 3


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
