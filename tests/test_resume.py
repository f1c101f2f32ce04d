"""No lost work: exact resume, stopping on signals with a checkpoint, atomic checkpoint files, and
a directory of its own for every run."""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import (
    DATA_CONFIGS,
    FAST,
    MLP_64,
    MODEL_CONFIGS,
    REPO_ROOT,
    compose_config,
    train_run,
)
from tests.fake_data import write_image_folder
from tests.test_cli import run_cli
from vae_experiments import read_metrics
from vae_experiments.cli.run_dirs import claim_fresh_dir, register_resolvers, resumed_config
from vae_experiments.cli.train import record_interruption
from vae_experiments.configs import CONFIG_DIR
from vae_experiments.data import ShuffledBatchSampler
from vae_experiments.data.datamodule import ImageDataModule
from vae_experiments.training import train
from vae_experiments.training.checkpoint_io import save_atomic
from vae_experiments.training.interrupt import Interruption, RunInterrupted

# A VAE on dynamically binarised digits: the batches, the binarisation and the reparameterised
# noise all depend on where training stands and on the random number generators.
RESUMABLE = [
    "model=vae",
    "model/network=mlp",
    "model.network.hidden_dims=[32]",
    "data.binarize=dynamic",
    "data.eval_batch_size=32",  # validation in several batches, for the signals sent in it
    "logger=none",
]
STEPS_PER_EPOCH = 1294 // 32  # digits' training split in FAST's batches of 32
TRAIN_PY = str(REPO_ROOT / "train.py")


def checkpoint(run_dir: Path, name: str = "last") -> dict:
    return torch.load(run_dir / "checkpoints" / f"{name}.ckpt", weights_only=True)


def assert_same_training(run_a: Path, run_b: Path) -> None:
    """Both runs ended with identical weights, step and test metrics."""
    last_a, last_b = checkpoint(run_a), checkpoint(run_b)
    assert last_a["global_step"] == last_b["global_step"]
    assert last_a["state_dict"].keys() == last_b["state_dict"].keys()
    for key, value in last_a["state_dict"].items():
        assert torch.equal(value, last_b["state_dict"][key]), key
    metrics_a, metrics_b = read_metrics(run_a), read_metrics(run_b)
    for key in metrics_a:
        if key.startswith("test/"):
            assert metrics_a[key] == metrics_b[key], key


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """Two epochs without a stop."""
    return train_run(tmp_path_factory.mktemp("straight") / "run", RESUMABLE)


def start_run(run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def test_resuming_after_an_epoch_ends_like_a_straight_run(tmp_path, straight_run):
    run_dir = train_run(tmp_path / "run", [*RESUMABLE, "trainer.max_epochs=1"])
    assert checkpoint(run_dir)["global_step"] == STEPS_PER_EPOCH
    train(compose_config([*FAST, *RESUMABLE]), run_dir, ckpt_path=run_dir / "checkpoints/last.ckpt")
    assert_same_training(straight_run, run_dir)


def test_a_fused_run_resumed_with_clipping_under_mixed_precision_trains_unfused(tmp_path):
    """Lightning refuses to clip the gradients of a fused optimizer under mixed precision: a run
    trained fused (the default) and resumed with both goes on with torch's unfused Adam, which
    reads the same state."""
    run_dir = train_run(tmp_path / "run", [*RESUMABLE, "trainer.max_epochs=1"])
    saved = checkpoint(run_dir)["optimizer_states"][0]["param_groups"][0]
    assert saved["fused"] is True
    mixed = ["trainer.precision=bf16-mixed", "trainer.gradient_clip_val=1.0"]
    train(
        compose_config([*FAST, *RESUMABLE, *mixed]),
        run_dir,
        ckpt_path=run_dir / "checkpoints/last.ckpt",
    )
    resumed = checkpoint(run_dir)
    assert resumed["global_step"] == 2 * STEPS_PER_EPOCH
    assert not resumed["optimizer_states"][0]["param_groups"][0]["fused"]


@pytest.mark.parametrize(
    "stop_step",
    [1, STEPS_PER_EPOCH + 17, STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH - 1],
    ids=["first-step", "mid-epoch", "epoch-end", "last-step"],
)
def test_a_signal_saves_a_checkpoint_that_resumes_exactly(
    tmp_path, straight_run, monkeypatch, stop_step
):
    """SIGTERM arrives during step ``stop_step``; the run stops after it with a checkpoint, and
    the resumed run ends as if it had never stopped. One step at a time (``steps_per_group=1``:
    Lightning's per-batch hooks every step, so the signal can be sent from one; groups of steps
    are stopped and resumed in ``test_step_groups.py``), resumed in groups."""

    def send_sigterm(self, trainer, *args):
        if trainer.global_step == stop_step:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Interruption, "on_train_batch_end", send_sigterm, raising=False)
    run_dir = start_run(tmp_path / "run")
    with pytest.raises(RunInterrupted) as stopped:
        train(compose_config([*FAST, *RESUMABLE, "steps_per_group=1"]), run_dir)
    assert stopped.value.signal_name == "SIGTERM"
    assert stopped.value.step == stop_step
    assert stopped.value.checkpoint == run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint(run_dir)["global_step"] == stop_step
    assert not (run_dir / "metrics.json").exists()

    monkeypatch.undo()
    train(compose_config([*FAST, *RESUMABLE]), run_dir, ckpt_path=run_dir / "checkpoints/last.ckpt")
    assert_same_training(straight_run, run_dir)


def test_a_signal_during_validation_stops_at_the_next_batch_and_resumes_exactly(
    tmp_path, straight_run, monkeypatch
):
    """A cluster's grace period can be shorter than a validation pass: the pass stops after
    the batch in progress, and the resumed run validates that epoch again from the start."""
    validated = []

    def send_sigterm(self, trainer, pl_module, outputs, batch, batch_idx, *_):
        if not trainer.sanity_checking:
            validated.append(batch_idx)
            if batch_idx == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Interruption, "on_validation_batch_end", send_sigterm, raising=False)
    run_dir = start_run(tmp_path / "run")
    with pytest.raises(RunInterrupted) as stopped:
        train(compose_config([*FAST, *RESUMABLE]), run_dir)
    assert validated == [0, 1]  # not the whole pass
    assert stopped.value.step == STEPS_PER_EPOCH and stopped.value.phase == "training"
    assert checkpoint(run_dir)["global_step"] == STEPS_PER_EPOCH
    assert not (run_dir / "checkpoints" / "best.ckpt").exists()  # epoch 0 was not validated

    monkeypatch.undo()
    train(compose_config([*FAST, *RESUMABLE]), run_dir, ckpt_path=run_dir / "checkpoints/last.ckpt")
    assert_same_training(straight_run, run_dir)
    best_a, best_b = checkpoint(straight_run, "best"), checkpoint(run_dir, "best")
    assert best_a["global_step"] == best_b["global_step"]


def test_a_signal_during_the_test_keeps_last_ckpt_and_resume_runs_the_test(
    tmp_path, straight_run, monkeypatch
):
    def send_sigterm(self, trainer, *args):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Interruption, "on_test_batch_end", send_sigterm, raising=False)
    run_dir = start_run(tmp_path / "run")
    with pytest.raises(RunInterrupted) as stopped:
        train(compose_config([*FAST, *RESUMABLE]), run_dir)
    assert stopped.value.phase == "testing" and stopped.value.checkpoint is None
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert "during the test, after training finished" in str(stopped.value)
    assert not (run_dir / "metrics.json").exists()
    # last.ckpt is where training ended, not the best checkpoint's weights loaded for the test.
    last, straight_last = checkpoint(run_dir), checkpoint(straight_run)
    assert last["global_step"] == straight_last["global_step"] == 2 * STEPS_PER_EPOCH
    for key, value in straight_last["state_dict"].items():
        assert torch.equal(last["state_dict"][key], value), key

    record_interruption(run_dir, stopped.value)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted" and status["signal"] == "SIGTERM"
    assert status["training"] == "finished" and status["phase"] == "testing"
    assert status["resume_command"] == f"python train.py resume={run_dir}"

    monkeypatch.undo()
    train(compose_config([*FAST, *RESUMABLE]), run_dir, ckpt_path=run_dir / "checkpoints/last.ckpt")
    assert checkpoint(run_dir)["global_step"] == 2 * STEPS_PER_EPOCH  # nothing trained again
    assert_same_training(straight_run, run_dir)
    # metrics.json as an uninterrupted run's: the same keys (val/* from the checkpoint, as this
    # session validated nothing), the same values but timings, and the first session's timings.
    metrics, straight = read_metrics(run_dir), read_metrics(straight_run)
    timings = {"train_seconds", "seconds_per_epoch"}
    assert metrics.keys() == straight.keys() and any(k.startswith("val/") for k in metrics)
    assert {k: v for k, v in metrics.items() if k not in timings} == {
        k: v for k, v in straight.items() if k not in timings
    }
    timer = checkpoint(run_dir)["callbacks"]["EpochTimer"]
    assert len(timer["epoch_seconds"]) == 2  # last.ckpt holds its own epoch's time too
    assert metrics["seconds_per_epoch"] == round(timer["epoch_seconds"][1], 4) > 0
    assert metrics["train_seconds"] >= round(timer["train_seconds"], 3) > 0


def test_sampler_resumes_inside_an_epoch():
    sampler = ShuffledBatchSampler(20, 4, shuffle=True, drop_last=True, seed=1)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.resume_at(epoch=3, batches_done=2)
    assert len(sampler) == 5  # Lightning counts the whole epoch
    assert [b.tolist() for b in sampler] == [b.tolist() for b in full[2:]]
    assert [b.tolist() for b in sampler] == [b.tolist() for b in full]  # once only

    sampler.resume_at(epoch=3, batches_done=5)  # epoch 3 was complete: epoch 4 from its start
    sampler.set_epoch(4)
    expected = ShuffledBatchSampler(20, 4, shuffle=True, drop_last=True, seed=1)
    expected.set_epoch(4)
    assert [b.tolist() for b in sampler] == [b.tolist() for b in expected]


def test_data_loading_leaves_the_global_rng_alone():
    datamodule = ImageDataModule(instantiate(compose_config(FAST).data))
    datamodule.setup()
    state = torch.get_rng_state()
    for _ in range(2):
        next(iter(datamodule.train_dataloader()))
    assert torch.equal(torch.get_rng_state(), state)


# ----------------------------------------------------------------------------- the command line


def start_training(run_dir: Path, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, TRAIN_PY, *FAST, *RESUMABLE, *extra, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


# All three with -m slow, to keep the default suite under 10 minutes: the default suite signals
# train.py in test_cli's Ctrl-C test, and checks exact resume after a signal in process
# (test_a_signal_saves_a_checkpoint_that_resumes_exactly); the three go through one handler.
@pytest.mark.parametrize(
    "signal_name",
    [
        pytest.param("SIGTERM", marks=pytest.mark.slow),
        pytest.param("SIGINT", marks=pytest.mark.slow),
        pytest.param("SIGUSR1", marks=pytest.mark.slow),
    ],
)
def test_signal_to_train_py_then_resume_ends_like_a_straight_run(tmp_path, signal_name):
    epochs = ["trainer.max_epochs=6"]
    straight = train_run(tmp_path / "straight", [*RESUMABLE, *epochs])

    run_dir = tmp_path / "run"
    process = start_training(run_dir, epochs)
    try:
        wait_for(run_dir / "checkpoints" / "last.ckpt", process)  # the first epoch is done
        time.sleep(random.Random(signal_name).uniform(0.0, 0.3))  # somewhere in a later epoch
        process.send_signal(getattr(signal, signal_name))
        output, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + getattr(signal, signal_name), output[-3000:]
    assert f"stopped by {signal_name}" in output
    assert f"python train.py resume={run_dir}" in output
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted" and status["signal"] == signal_name
    assert status["resume_from"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert checkpoint(run_dir)["global_step"] == status["step"]
    assert not (run_dir / "metrics.json").exists()

    result = run_cli([sys.executable, TRAIN_PY, f"resume={run_dir}"], cwd=tmp_path)
    assert "resuming" in result.stdout + result.stderr
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    assert_same_training(straight, run_dir)


@pytest.mark.slow  # kills at four random moments: a soak, about a minute
def test_a_killed_run_always_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL (no chance to clean up) at random moments, resuming after each: the newest
    checkpoint always loads, and the run still finishes."""
    run_dir = tmp_path / "run"
    # An epoch of two steps, so that checkpoints are written many times a second.
    fast_epochs = ["trainer.max_epochs=400", "+trainer.limit_train_batches=2", "logger=none"]
    draw = random.Random(0)
    process = start_training(run_dir, fast_epochs)
    for attempt in range(4):
        try:
            wait_for(run_dir / "checkpoints" / "last.ckpt", process)
            time.sleep(draw.uniform(0.0, 1.0))
            process.kill()
            process.wait(timeout=30)
        finally:
            process.kill()
        for name in ("last", "best"):
            loaded = checkpoint(run_dir, name)
            assert loaded["global_step"] > 0, (attempt, name)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        process = subprocess.Popen(
            [sys.executable, TRAIN_PY, f"resume={run_dir}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    assert checkpoint(run_dir)["global_step"] == 400 * 2


def test_an_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save_atomic({"step": 1}, path)

    def torch_save_dies_halfway(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torch_save_dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_resume_by_the_runs_own_command_applies_changed_values_and_refuses_the_rest(tmp_path):
    """What a cluster script does: the run's own command line with resume= (and new values)
    appended. Same group choices are accepted, other groups, a finished run with nothing to
    train and an unreadable checkpoint are refused without changing anything, and changed
    values (max_epochs, lr, weight decay) take effect."""
    run_dir = tmp_path / "run"
    own_command = [
        sys.executable,
        TRAIN_PY,
        *FAST,
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=3",
        "logger=none",
        # An MLP run: its keys (model.network.hidden_dims) are not in the default conv model.
        "model/network=mlp",
        "model.network.hidden_dims=[16]",
        f"hydra.run.dir={run_dir}",
    ]
    run_cli(own_command, cwd=tmp_path)
    original = (run_dir / "config.yaml").read_text()
    first = read_metrics(run_dir)

    def untouched() -> None:
        assert (run_dir / "config.yaml").read_text() == original
        assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
        assert read_metrics(run_dir) == first
        assert not list(run_dir.glob("config.before-resume-*"))

    refused = run_cli(
        [sys.executable, TRAIN_PY, f"resume={run_dir}", "model=ae"],
        cwd=tmp_path,
        expect_success=False,
    )
    assert refused.returncode != 0
    assert "model=ae: this run was trained with model=vae" in refused.stderr
    untouched()

    finished = run_cli([*own_command, f"resume={run_dir}"], cwd=tmp_path, expect_success=False)
    assert finished.returncode != 0
    assert "the run finished at epoch 1 (trainer.max_epochs=1); raise trainer.max_epochs" in (
        finished.stderr
    )
    untouched()

    more = [f"resume={run_dir}", "trainer.max_epochs=2", "optimizer.lr=1e-4"]
    more.append("optimizer.weight_decay=0.01")
    last = run_dir / "checkpoints" / "last.ckpt"
    intact = last.read_bytes()
    last.write_bytes(intact[: len(intact) // 2])  # a copy killed halfway, a full disk
    truncated = run_cli([*own_command, *more], cwd=tmp_path, expect_success=False)
    assert truncated.returncode != 0
    assert f"{last} cannot be read" in truncated.stderr
    assert f"continue from it with resume={run_dir / 'checkpoints' / 'best.ckpt'}" in (
        truncated.stderr
    )
    untouched()
    last.write_bytes(intact)

    run_cli([*own_command, *more], cwd=tmp_path)
    metrics = read_metrics(run_dir)
    assert metrics["epochs"] == 2 and metrics["steps"] == 6
    assert metrics["train_seconds"] > first["train_seconds"]  # both sessions' training
    assert (run_dir / "config.before-resume-1.yaml").read_text() == original
    resumed = OmegaConf.load(run_dir / "config.yaml")
    assert resumed.trainer.max_epochs == 2 and resumed.model.latent_dim == 4
    assert resumed.optimizer.lr == 1e-4 and list(resumed.model.network.hidden_dims) == [16]
    group = checkpoint(run_dir)["optimizer_states"][0]["param_groups"][0]
    assert group["lr"] == 1e-4 and group["weight_decay"] == 0.01


def test_resumed_config_applies_typed_values_from_the_command_line():
    saved = compose_config(["model=ae", "model.network.channels=[8]"])
    composed = compose_config(["trainer.max_epochs=7", "model.network.channels=[16,8]"])
    trained = Path("run/checkpoints/last.ckpt")
    config, changed = resumed_config(
        saved, composed, ["resume=x", "trainer.max_epochs=7"], checkpoint=trained
    )
    assert config.trainer.max_epochs == 7 and config.model._target_ == saved.model._target_
    assert changed == ["trainer.max_epochs=7"]
    # Before its first checkpoint a run has trained nothing: any value may change.
    overrides = ["resume=x", "trainer.max_epochs=7", "model.network.channels=[16,8]"]
    config, changed = resumed_config(saved, composed, overrides, checkpoint=None)
    assert config.trainer.max_epochs == 7 and list(config.model.network.channels) == [16, 8]
    assert changed == ["trainer.max_epochs=7", "model.network.channels=[16,8]"]
    with pytest.raises(ValueError, match="model/network=mlp: a resumed run keeps"):
        resumed_config(saved, composed, ["model/network=mlp"], checkpoint=None)
    # The run's own choices, re-typed from its command line, are accepted.
    choices = {"model": "ae", "model/network": "conv", "data": "digits"}
    config, changed = resumed_config(
        saved,
        composed,
        ["model=ae", "model/network=conv", "trainer.max_epochs=7"],
        choices,
        checkpoint=trained,
    )
    assert changed == ["trainer.max_epochs=7"]
    with pytest.raises(ValueError, match="model=vae: this run was trained with model=ae"):
        resumed_config(saved, composed, ["model=vae"], choices, checkpoint=trained)
    with pytest.raises(ValueError, match="data=mnist: a resumed run keeps"):
        resumed_config(saved, composed, ["data=mnist"], checkpoint=trained)
    with pytest.raises(ValueError, match="experiment=burda_vae_1layer: a resumed run keeps"):
        resumed_config(saved, composed, ["experiment=burda_vae_1layer"], checkpoint=trained)


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("resume={tmp}/nowhere", "does not exist; pass the run directory"),
        pytest.param("resume={tmp}", "has no config.yaml", marks=pytest.mark.slow),
        pytest.param(
            "resume={tmp}/missing.ckpt", "no such checkpoint file", marks=pytest.mark.slow
        ),
    ],
)
def test_resume_of_something_that_is_no_run_says_so(tmp_path, argument, message):
    result = run_cli(
        [sys.executable, TRAIN_PY, argument.format(tmp=tmp_path)],
        cwd=tmp_path,
        expect_success=False,
    )
    assert result.returncode != 0 and message in result.stderr
    assert list(tmp_path.iterdir()) == []  # no directory was made for it


def test_ckpt_path_starts_a_new_run_from_a_checkpoint(tmp_path):
    first = train_run(tmp_path / "first", [*RESUMABLE, "trainer.max_epochs=1"])
    second = start_run(tmp_path / "second")
    train(compose_config([*FAST, *RESUMABLE]), second, ckpt_path=first / "checkpoints/last.ckpt")
    assert read_metrics(second)["steps"] == 2 * STEPS_PER_EPOCH
    assert checkpoint(first)["global_step"] == STEPS_PER_EPOCH  # the first run is untouched


def test_every_run_gets_a_directory_of_its_own(tmp_path):
    pattern = str(tmp_path / "outputs" / "12-00-00")
    chosen = [claim_fresh_dir(pattern) for _ in range(3)]
    assert chosen == [pattern, f"{pattern}_1", f"{pattern}_2"]
    assert all(Path(path).is_dir() for path in chosen)


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.core.utils import setup_globals

    monkeypatch.chdir(tmp_path)
    register_resolvers()  # as importing vae_experiments.cli does
    dirs = []
    try:
        for _ in range(2):
            with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
                cfg = compose(config_name="train", return_hydra_config=True)
            # The same second for both: Hydra's ${now:...} stood still.
            OmegaConf.register_new_resolver("now", lambda pattern: "12-00-00", replace=True)
            dirs.append(cfg.hydra.run.dir)
            assert cfg.hydra.run.dir == dirs[-1]  # chosen once, then kept
    finally:
        setup_globals()  # Hydra's own ${now:...} again
    # Named after what the run is: the default model and data, no overrides.
    assert dirs == [
        "outputs/12-00-00/12-00-00-vae-digits",
        "outputs/12-00-00/12-00-00-vae-digits_1",
    ]
    assert all((tmp_path / d).is_dir() for d in dirs)
    assert cfg.hydra.output_subdir == ".hydra"


def test_a_directory_that_holds_a_run_is_never_written_again(tmp_path):
    run_dir = tmp_path / "runs" / "mine"
    quick = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "logger=none"]
    command = [sys.executable, TRAIN_PY, *FAST, *quick, f"hydra.run.dir={run_dir}"]
    run_cli(command, cwd=tmp_path)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}

    again = run_cli(command, cwd=tmp_path, expect_success=False)
    assert again.returncode != 0
    assert f"hydra.run.dir={run_dir} names a directory that already holds a run" in again.stderr
    assert f"resume={run_dir}" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before


def test_last_ckpt_is_rewritten_every_epoch_even_when_best_is_not(tmp_path):
    # mode=max on a falling val/loss: the first epoch stays the "best", later ones are not.
    run_dir = train_run(
        tmp_path / "run", [*RESUMABLE, "trainer.max_epochs=3", "callbacks.checkpoint.mode=max"]
    )
    assert checkpoint(run_dir, "best")["global_step"] == STEPS_PER_EPOCH
    assert checkpoint(run_dir, "last")["global_step"] == 3 * STEPS_PER_EPOCH
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    # metrics.json's times are the whole training's, not those of the best checkpoint tested.
    timer = checkpoint(run_dir, "last")["callbacks"]["EpochTimer"]
    assert len(timer["epoch_seconds"]) == 3
    assert read_metrics(run_dir)["train_seconds"] >= round(timer["train_seconds"], 3)


def test_a_sweep_directory_that_holds_runs_is_refused(tmp_path):
    from vae_experiments.cli.run_dirs import refuse_existing_run_dir

    sweep = tmp_path / "multirun" / "mine"
    (sweep / "0" / ".hydra").mkdir(parents=True)
    (sweep / "0" / ".hydra" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(SystemExit, match="already holds runs"):
        refuse_existing_run_dir(["-m", f"hydra.sweep.dir={sweep}", "model=ae,vae"])
    refuse_existing_run_dir(["-m", f"hydra.sweep.dir={tmp_path / 'multirun' / 'new'}"])
    refuse_existing_run_dir([f"hydra.sweep.dir={sweep}"])  # not a sweep: run.dir counts


@pytest.mark.slow  # trains a run, then one refusal
def test_resume_and_ckpt_path_together_are_refused(tmp_path):
    run_dir = train_run(tmp_path / "run", [*RESUMABLE, "trainer.max_epochs=1"])
    result = run_cli(
        [
            sys.executable,
            TRAIN_PY,
            f"resume={run_dir}",
            f"ckpt_path={run_dir}/checkpoints/last.ckpt",
        ],
        cwd=tmp_path,
        expect_success=False,
    )
    assert result.returncode != 0
    assert "resume= and ckpt_path= cannot go together" in result.stderr


def test_resume_refuses_max_epochs_below_the_checkpoints_epoch(tmp_path):
    """Lowering trainer.max_epochs under the epoch the checkpoint reached: refused by name,
    before anything is written (Lightning would fail inside fit, after the status changed)."""
    from vae_experiments.cli.train import _refuse_max_epochs_below
    from vae_experiments.targets import ConfigError

    cfg = compose_config(["trainer.max_epochs=4"])
    with pytest.raises(ConfigError, match=r"trainer.max_epochs=4 is invalid: .* at epoch 18"):
        _refuse_max_epochs_below(tmp_path, cfg, 18)
    _refuse_max_epochs_below(tmp_path, cfg, 4)  # the run ends at once, as Lightning does
    _refuse_max_epochs_below(tmp_path, compose_config(["trainer.max_epochs=-1"]), 18)


# ------------------------------------------------ what a resume may change, and ckpt_path= models

#: The data settings a resume may change: how the data are loaded, not which.
DATA_LOADING = {
    "data.num_workers",
    "data.eval_batch_size",
    "data.on_device",
    "data.source.cache",
    "data.source.cache_dir",
    "data.source.download",
}
#: train.yaml's own keys (outside the config groups), each decided: may a resume change it?
TOP_LEVEL: dict[str, bool | None] = {
    "seed": False,  # the run's randomness, data.seed's too
    "optimized_metric": True,
    "test_ckpt": True,
    "resume": None,  # which run and checkpoint: resumed_config passes them by
    "ckpt_path": None,
    "compile": True,
    "channels_last": True,
    "steps_per_group": True,
    "float32_matmul_precision": True,
    "threads": True,  # how many cores compute it, not what is computed
    "callbacks.checkpoint.monitor": False,  # what best.ckpt is chosen on
    "callbacks.checkpoint.mode": False,
    "callbacks.image_grids.num_images": True,
    "callbacks.latent_samples.enabled": True,
    "callbacks.latent_samples.num_samples": True,
    "callbacks.latent_samples.components": True,
    "callbacks.progress_bar.refresh_rate": True,
}


def files(run_dir: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}


def leaf_keys(node, prefix: str) -> list[str]:
    """Every dotted key below ``node`` that holds a value (lists count as values)."""
    if not isinstance(node, dict):
        return [prefix]
    return [key for name, value in node.items() for key in leaf_keys(value, f"{prefix}.{name}")]


@pytest.mark.parametrize(
    "overrides",
    [[f"model={m}"] for m in MODEL_CONFIGS]
    + [[f"data={d}"] for d in DATA_CONFIGS]
    + [["model/network=mlp", "optimizer=lbfgs", "scheduler=cosine", "logger=many"]],
    ids=lambda overrides: "-".join(overrides),
)
def test_a_resume_changes_how_long_and_how_a_run_trains_never_what_or_on_what_data(overrides):
    """Every key of every shipped config is decided: model.* and data.* (but how the data are
    loaded) stay as trained; trainer.*, optimizer.*, scheduler.*, logger.* may change, but the
    classes built and the validation batches best.ckpt is chosen on; train.yaml's own keys as
    TOP_LEVEL says (a new key there fails here until it is decided)."""
    from vae_experiments.cli.run_dirs import resume_may_change

    cfg = OmegaConf.to_container(compose_config(overrides), resolve=False)
    for group, node in cfg.items():
        for key in leaf_keys(node, group):
            if group == "model":
                assert not resume_may_change(key), key
            elif group == "data":
                assert resume_may_change(key) == (key in DATA_LOADING), key
            elif group in ("trainer", "optimizer", "scheduler", "logger"):
                keeps = key.endswith(("._target_", "._partial_"))
                assert resume_may_change(key) != keeps, key
            elif TOP_LEVEL[key] is not None:
                assert resume_may_change(key) == TOP_LEVEL[key], key
    for kept in ("trainer.limit_val_batches", "trainer.overfit_batches", "data.batch_size"):
        assert not resume_may_change(kept)
    assert resume_may_change("trainer.limit_train_batches")
    assert resume_may_change("data.source.cache_dir") and not resume_may_change("data.source")


def test_a_resume_that_changes_the_objective_is_refused_with_a_command_for_a_new_run(tmp_path):
    """resume=RUN model.beta=4 would train on with beta 4 and pick best.ckpt across two
    objectives: one error line naming the key, the run's value and the new one, exit 2, the
    run untouched; the command it gives starts a new run from the checkpoint, and composes the
    run's own model (the checkpoint's weights fit it)."""
    from vae_experiments.runs.load import check_checkpoint_model

    run_dir = tmp_path / "run"
    started = [*FAST, "trainer.max_epochs=1", "+trainer.limit_train_batches=3", *RESUMABLE]
    run_cli([sys.executable, TRAIN_PY, *started, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    before = files(run_dir)

    refused = run_cli(
        [sys.executable, TRAIN_PY, f"resume={run_dir}", "model.beta=4", "trainer.max_epochs=2"],
        cwd=tmp_path,
        expect_success=False,
    )
    assert refused.returncode == 2
    (line,) = refused.stderr.splitlines()
    assert line.startswith("error: model.beta=4 (this run was trained with model.beta=1.0): ")
    last = run_dir / "checkpoints" / "last.ckpt"
    assert line.endswith(f" model.beta=4 trainer.max_epochs=2 ckpt_path={last}")
    assert files(run_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    command = shlex.split(line.partition("instead: ")[2])
    assert command[:2] == ["python", "train.py"] and "trainer.max_epochs=1" not in command
    new_run = compose_config([o for o in command[2:] if not o.startswith("ckpt_path=")])
    assert new_run.model.beta == 4 and new_run.trainer.max_epochs == 2
    check_checkpoint_model(last, new_run)  # the run's own model: its weights load


@pytest.mark.slow  # trains twice through train.py
def test_a_resume_onto_another_dataset_is_refused_unless_the_run_has_no_checkpoint(tmp_path):
    """resume=RUN data.source.path=<another folder> would train one run on two datasets: refused
    like any data change. A run that ended before its first checkpoint trained nothing, and is
    resumed with a corrected path."""
    first, second = tmp_path / "first", tmp_path / "second"
    write_image_folder(first, n=24)
    write_image_folder(second, n=24, seed=1)
    run_dir = tmp_path / "run"
    folder = [
        "data=image_folder",
        "data.source.image_size=8",
        "data.source.channels=1",
        f"data.source.cache_dir={tmp_path / 'cache'}",
        "data.num_workers=0",
        "data.batch_size=8",
    ]
    started = [*FAST, "trainer.max_epochs=1", "logger=none", *MLP_64, *folder]
    run_cli(
        [
            sys.executable,
            TRAIN_PY,
            *started,
            f"data.source.path={first}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    before = files(run_dir)
    resume = [sys.executable, TRAIN_PY, f"resume={run_dir}", f"data.source.path={second}"]
    refused = run_cli([*resume, "trainer.max_epochs=2"], cwd=tmp_path, expect_success=False)
    assert refused.returncode == 2
    (line,) = refused.stderr.splitlines()
    assert line.startswith(
        f"error: data.source.path={second} (this run was trained with data.source.path={first})"
    )
    assert files(run_dir) == before

    # As a run that failed before its first checkpoint: nothing trained, the path corrected.
    for path in (run_dir / "checkpoints").iterdir():
        path.unlink()
    (run_dir / "metrics.json").unlink()
    (run_dir / "status.json").write_text('{"status": "failed"}')
    resumed = run_cli(resume, cwd=tmp_path)
    assert "has no checkpoint yet: training it again from the start" in resumed.stdout
    assert OmegaConf.load(run_dir / "config.yaml").data.source.path == str(second)
    assert read_metrics(run_dir)["epochs"] == 1


def test_ckpt_path_of_another_model_is_refused_naming_the_difference(tmp_path):
    """An AE's checkpoint into a VAE run: one line naming model class and latent size, exit 2,
    no run folder; a checkpoint file on its own: a few differing weights with their shapes."""
    from vae_experiments.runs.load import CheckpointModelError, check_checkpoint_model

    ae = train_run(tmp_path / "ae", ["model=ae", *MLP_64, "trainer.max_epochs=1", "logger=none"])
    last = ae / "checkpoints" / "last.ckpt"
    refused = run_cli(
        [sys.executable, TRAIN_PY, *FAST, *MLP_64, "model=vae", "model.latent_dim=8"]
        + [f"ckpt_path={last}"],
        cwd=tmp_path,
        expect_success=False,
    )
    assert refused.returncode == 2
    (line,) = refused.stderr.splitlines()
    assert line.startswith(f"error: ckpt_path={last} holds another model than this run's: ")
    assert "model class: VAE here, Autoencoder in the checkpoint" in line
    assert "latent size: 8 here, 4 in the checkpoint" in line
    assert "leave ckpt_path out" in line and "state_dict" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ae"]  # no run folder left

    alone = tmp_path / "alone.ckpt"
    alone.write_bytes(last.read_bytes())
    cfg = compose_config([*FAST, "model=ae", "model/network=mlp", "model.network.hidden_dims=[32]"])
    with pytest.raises(CheckpointModelError) as error:
        check_checkpoint_model(alone, cfg)
    message = str(error.value)
    assert message.startswith(f"ckpt_path={alone} holds the weights of another model")
    assert "shape: decoder.net.0.weight [32, 4] here, [64, 4] in the checkpoint" in message
    assert len(message) < 400 and "more)" in message
    check_checkpoint_model(alone, compose_config([*FAST, "model=ae", *MLP_64]))  # its own model
