"""The benchmark script runs and compares like with like (no timing assertions: the script's
table is the record, see BENCHMARKS.md)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"
HAND_WRITTEN = SCRIPT.with_name("hand_written.py")


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_unknown_case_is_rejected_with_the_choices(capsys):
    benchmark = load_benchmark()
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--cases", "mlp_vea"])
    assert "unknown case or variant ['mlp_vea']" in capsys.readouterr().err


def test_plain_iwae_agrees_with_ours():
    import torch

    from vae_experiments.models import MLP, VAE, Bernoulli

    benchmark = load_benchmark()
    torch.manual_seed(0)
    model = VAE([1, 8, 8], 3, MLP([16]), Bernoulli(), beta=1.0, kl_warmup_steps=0).eval()
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    plain = benchmark.plain_iwae(model, images, k=2000, max_batch_elems=2**16, batch_size=4)
    ours = benchmark.our_iwae(model, images, k=2000, max_batch_elems=2**16, batch_size=4)
    # Different random draws of the same estimator, k=2000: equal to well under a nat.
    assert float(plain.mean()) == pytest.approx(ours, abs=0.05)


@pytest.mark.slow
def test_benchmark_runs_a_case_and_writes_markdown(tmp_path):
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    benchmark = load_benchmark()
    output = tmp_path / "table.md"
    argv = ["--cases", "mlp_vae", "--epochs", "2", "--repeats", "1", "--smoke", "20"]
    benchmark.main([*argv, "--markdown", str(output)])
    table = output.read_text()
    rows = ["hand-written", "plain loop around our model.loss", "ours"]
    assert all(f"| mlp_vae | {row} |" in table for row in rows)
    # Independent loops, same model, data and objective: nearly the same test loss.
    assert "same objective as hand-written" in table


def test_the_table_replaces_only_its_own_machines_section(tmp_path):
    benchmark = load_benchmark()
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nHow to run it.\n\n### CPU A\n\nold A\n\n### GPU B\n\nold B\n")
    benchmark.write_section(path, "### CPU A\n\nnew A\n")
    benchmark.write_section(path, "### GPU C\n\nnew C\n")
    text = path.read_text()
    assert text == (
        "# Benchmarks\n\nHow to run it.\n\n### CPU A\n\nnew A\n\n### GPU B\n\nold B\n\n"
        "### GPU C\n\nnew C\n"
    )


def test_batch20_stands_for_the_small_batch_cases_which_validate_on_every_image():
    benchmark = load_benchmark()
    args = benchmark.parse_args(["--cases", "batch20,iwae"])
    assert args.cases == ["burda", "tiny", "iwae"]
    for name in args.cases[:2]:  # batch 20 and 1,000 steps per epoch, as BENCHMARKS.md says
        cfg = benchmark.compose(benchmark.TRAINING_CASES[name].overrides)
        assert cfg.data.batch_size == 20 and cfg.trainer.limit_train_batches == 1000
        assert benchmark.batch_limit(cfg, "val") is None  # a user's run validates it all


def test_the_hand_written_loop_gets_the_burda_presets_settings():
    benchmark = load_benchmark()
    cfg = benchmark.compose(benchmark.TRAINING_CASES["burda"].overrides)
    options = benchmark.hand_written_options(cfg, num_val=5000)
    given = dict(zip(options[::2], options[1::2], strict=True))
    assert given["--network"] == "mlp" and given["--hidden"] == "200,200"
    assert given["--activation"] == "tanh" and given["--latent"] == "50"
    assert given["--batch-size"] == given["--eval-batch-size"] == "20"
    assert given["--binarize"] == "dynamic" and float(given["--eps"]) == 1e-4
    assert given["--lr-milestones"].startswith("1,4,13,")  # Burda's schedule, as ours has it
    assert math.isclose(float(given["--lr-gamma"]), 10 ** (-1 / 7))
    assert given["--max-train-batches"] == "1000" and "--max-val-batches" not in given


def test_the_hand_written_loop_refuses_what_it_does_not_have():
    benchmark = load_benchmark()
    overrides = [*benchmark.TRAINING_CASES["mlp_vae"].overrides, "model/likelihood=gaussian"]
    with pytest.raises(SystemExit, match="needs model.likelihood=Bernoulli, the case has Gaussian"):
        benchmark.hand_written_options(benchmark.compose(overrides), num_val=5000)


def test_same_objective_within_the_tolerance_only():
    benchmark = load_benchmark()
    assert benchmark.same_objective(250.0, 251.0)[0]
    agree, note = benchmark.same_objective(250.0, 280.0)  # e.g. a KL left out on one side
    assert not agree and "NOT the same objective" in note


@pytest.mark.parametrize(
    "options",
    [
        ["--network", "conv", "--channels", "4,8", "--channels-last"],
        ["--hidden", "16,16", "--activation", "tanh", "--binarize", "dynamic", "--eps", "1e-4"]
        + ["--lr-milestones", "1", "--lr-gamma", "0.5", "--eval-batch-size", "16"],
    ],
    ids=["conv", "mlp_burda_like"],
)
def test_hand_written_loop_trains_and_imports_nothing_of_ours(tmp_path, options):
    from tests.fake_data import write_idx_dataset

    write_idx_dataset(tmp_path, n_train=48, n_test=12, gz=True, name="FashionMNIST")
    env = {**os.environ, "VAE_DATA_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    sizes = ["--val-size", "16", "--batch-size", "8", "--latent", "2", "--epochs", "2"]
    done = subprocess.run(
        [sys.executable, str(HAND_WRITTEN), *sizes, *options, "--max-val-batches", "1"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    result = json.loads(done.stdout)
    assert len(result["epoch_seconds"]) == len(result["epoch_cpu_seconds"]) == 2
    assert result["steps"] == 4 and result["images"] == 32  # (48 - 16) // 8 batches
    assert math.isfinite(result["test_loss"]) and result["test_loss"] > 0
    assert result["foreign_modules"] == [] and result["threads"] >= 1
    assert "epoch 2: val loss" in done.stderr


def test_epoch_timer_records_each_epochs_wall_and_cpu_seconds():
    from vae_experiments.training.callbacks import EpochTimer

    timer = EpochTimer()
    for _ in range(2):
        timer.on_train_epoch_start(None, None)
        sum(i * i for i in range(200_000))  # some CPU work
        timer.on_train_epoch_end(None, None)
    state = timer.state_dict()
    assert len(state["epoch_seconds"]) == len(state["epoch_cpu_seconds"]) == 2
    assert all(t > 0 for t in state["epoch_cpu_seconds"])
    restored = EpochTimer()
    restored.load_state_dict({"epoch_seconds": [1.0]})  # a checkpoint from before CPU times
    assert restored.epoch_cpu_seconds == []


def test_plain_loop_runs_channels_last_dynamic_binarization_and_a_schedule():
    import torch

    from vae_experiments.models import VAE, Bernoulli, Conv

    benchmark = load_benchmark()
    torch.manual_seed(0)
    model = VAE([1, 8, 8], 2, Conv([4, 8]), Bernoulli(), beta=1.0, kl_warmup_steps=0)
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    wall, cpu = benchmark.plain_training(
        model,
        images,
        images,
        4,
        2,
        torch.optim.Adam,
        0,
        None,
        None,
        torch.device("cpu"),
        dynamic_binarization=True,
        channels_last=True,
        lr_schedule=([1], 0.5),
        val_batch_size=8,
    )
    assert len(wall) == len(cpu) == 2
    weights = [p for p in model.parameters() if p.ndim == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)


@pytest.mark.parametrize("case", ["burda", "mlp_vae", "conv_vae"])
def test_the_hand_written_networks_have_our_models_layers(case):
    benchmark = load_benchmark()
    spec = importlib.util.spec_from_file_location("hand_written", HAND_WRITTEN)
    hand_written = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hand_written)
    cfg = benchmark.compose(benchmark.TRAINING_CASES[case].overrides)
    options = benchmark.hand_written_options(cfg, num_val=5000)
    given = dict(zip(options[::2], options[1::2], strict=True))
    latent = int(given["--latent"])
    if given["--network"] == "conv":
        channels = [int(c) for c in given["--channels"].split(",")]
        encoder, decoder = hand_written.conv_nets(channels, latent)
    else:
        hidden = [int(h) for h in given["--hidden"].split(",")]
        encoder, decoder = hand_written.mlp_nets(hidden, latent, given["--activation"])
    model = benchmark.build_model(cfg, (1, 28, 28))
    theirs = sorted(tuple(p.shape) for p in [*encoder.parameters(), *decoder.parameters()])
    assert theirs == sorted(tuple(p.shape) for p in model.parameters())
    activations = {type(m).__name__ for m in [*encoder.modules(), *decoder.modules()]}
    ours = {type(m).__name__ for m in model.modules()}
    assert activations & {"Tanh", "ReLU", "LeakyReLU"} == ours & {"Tanh", "ReLU", "LeakyReLU"}


def test_ours_runs_at_a_terminal_as_a_user_types_it(tmp_path):
    benchmark = load_benchmark()
    script = "import sys; print('terminal', sys.stderr.isatty()); sys.exit(3)"
    output = tmp_path / "run.out"
    status, _ = benchmark.run_process([sys.executable, "-c", script], output)
    assert status == 3
    assert "terminal True" in output.read_text()  # so train.py draws its progress bar
