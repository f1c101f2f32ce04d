"""The benchmark script runs and compares like with like (no timing assertions: the script's
table is the record, see BENCHMARKS.md)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"


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
    benchmark.main(["--cases", "mlp_vae", "--epochs", "2", "--markdown", str(output)])
    table = output.read_text()
    assert "| mlp_vae | plain |" in table and "| mlp_vae | ours |" in table
    # Same model, data and seed: both paths reach nearly the same test loss.
    plain, ours = (float(x) for x in re.findall(r"test loss ([\d.]+)", table))
    assert ours == pytest.approx(plain, rel=0.02)


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


def test_overhead_stands_for_the_overhead_cases():
    benchmark = load_benchmark()
    args = benchmark.parse_args(["--cases", "overhead,iwae"])
    assert args.cases == ["overhead_tiny", "overhead_burda", "iwae"]
    for name in args.cases[:2]:  # batch 20 and 1,000 steps per epoch, as BENCHMARKS.md says
        cfg = benchmark.compose(benchmark.TRAINING_CASES[name].overrides)
        assert cfg.data.batch_size == 20 and cfg.trainer.limit_train_batches == 1000


def test_the_cpu_clock_times_both_paths_and_is_put_back():
    import time

    from vae_experiments.training import callbacks

    benchmark = load_benchmark()
    with benchmark.clock("cpu"):
        assert callbacks.time.perf_counter is time.process_time  # our path's EpochTimer
        assert benchmark.time.perf_counter is time.process_time  # the plain loop
    assert callbacks.time is time and benchmark.time is time


def test_plain_loop_runs_channels_last_and_dynamic_binarization():
    import torch

    from vae_experiments.models import VAE, Bernoulli, Conv

    benchmark = load_benchmark()
    torch.manual_seed(0)
    model = VAE([1, 8, 8], 2, Conv([4, 8]), Bernoulli(), beta=1.0, kl_warmup_steps=0)
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    seconds = benchmark.plain_training(
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
    )
    assert len(seconds) == 2
    weights = [p for p in model.parameters() if p.ndim == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
