"""Likelihood evaluation: the IWAE estimate against a closed form, its properties on a trained VAE,
bits per dimension, active units, and ``scripts/evaluate.py`` end to end."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.distributions import MultivariateNormal, Normal

from tests.conftest import REPO_ROOT
from vae_experiments import load_run, read_metrics
from vae_experiments.analysis.likelihood import (
    bits_per_dim,
    bound_sample_counts,
    bounds_from_log_weights,
    count_active_units,
    evaluate_vae,
    iwae_log_likelihood,
)
from vae_experiments.models import VAE, Autoencoder, Gaussian, Linear, SquaredError
from vae_experiments.runs import (
    EVENT_FILE_GLOB,
    after_earlier_event_files,
    load_data,
    load_split,
    tensorboard_dir,
)
from vae_experiments.units import unit_tag

IMAGE_SHAPE = (1, 2, 3)
SIGMA = 0.5
BIG = 2**30  # max_batch_elems that never chunks


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def linear_gaussian_vae():
    """A linear-Gaussian VAE: z ~ N(0, I_2), x | z ~ N(W z + b, SIGMA^2 I_6).

    W has orthogonal columns, so the true posterior covariance S = (I + W^T W / SIGMA^2)^-1 is
    diagonal and the encoder (a diagonal Gaussian) can represent the exact posterior
    N(S W^T (x - b) / SIGMA^2, S). Returns the model (encoder set to the exact posterior), W, b and
    S's diagonal, all float64 except the model.
    """
    torch.manual_seed(0)
    model = VAE(
        image_shape=IMAGE_SHAPE,
        latent_dim=2,
        network=Linear(),
        likelihood=Gaussian(SIGMA, learn_sigma=False, min_sigma=1e-3),
        beta=1,
        kl_warmup_steps=0,
    ).eval()
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=seeded(1), dtype=torch.float64))
    w = q[:, :2] * torch.tensor([1.5, 0.7], dtype=torch.float64)  # (6, 2), orthogonal columns
    b = torch.randn(6, generator=seeded(2), dtype=torch.float64)
    s = 1 / (1 + w.square().sum(0) / SIGMA**2)  # diagonal of S, (2,)
    decoder, encoder = model.decoder.net[0], model.encoder.net[0]  # Linear(2, 6), Linear(6, 4)
    with torch.no_grad():
        decoder.weight.copy_(w)
        decoder.bias.copy_(b)
        mean_weight = s[:, None] * w.T / SIGMA**2  # (2, 6)
        encoder.weight.copy_(torch.cat([mean_weight, torch.zeros(2, 6, dtype=torch.float64)]))
        encoder.bias.copy_(torch.cat([-mean_weight @ b, s.log()]))
    return model, w, b, s


def closed_form_log_px(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log N(x; b, W W^T + SIGMA^2 I) per image, float64."""
    covariance = w @ w.T + SIGMA**2 * torch.eye(6, dtype=torch.float64)
    return MultivariateNormal(b, covariance).log_prob(x.double().flatten(1))


def sample_images(w: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    generator = seeded(3)
    z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    x = z @ w.T + b + SIGMA * torch.randn(n, 6, generator=generator, dtype=torch.float64)
    return x.float().view(n, *IMAGE_SHAPE)


@pytest.mark.parametrize("k", [1, 100])
def test_iwae_is_exact_with_the_exact_posterior(k):
    # With q(z | x) = p(z | x) every weight p(x, z) / q(z | x) equals p(x), whatever z is.
    model, w, b, _ = linear_gaussian_vae()
    x = sample_images(w, b, 32)
    model.train()
    estimate = iwae_log_likelihood(model, x, k=k, max_batch_elems=BIG, generator=seeded())
    assert model.training  # evaluated in eval mode, its mode restored
    assert estimate.dtype == torch.float64 and estimate.shape == (32,)
    torch.testing.assert_close(estimate, closed_form_log_px(x, w, b), rtol=0, atol=2e-5)


def test_log_importance_weights_match_an_independent_computation():
    model, w, b, _ = linear_gaussian_vae()
    x = sample_images(w, b, 5)
    noise = torch.randn(5, 7, 2, generator=seeded())
    with torch.no_grad():
        log_w, log_px_z = model.log_importance_weights(x, noise)
        mu, logvar = model.posterior(x)
        std = torch.exp(0.5 * logvar)
        z = mu[:, None] + std[:, None] * noise  # (5, 7, 2)
        mean = model.decoder(z.flatten(0, 1)).view(5, 7, -1)  # (5, 7, 6)
        expected_px_z = Normal(mean, SIGMA).log_prob(x.flatten(1)[:, None]).sum(-1)
        expected = (
            expected_px_z
            + Normal(0.0, 1.0).log_prob(z).sum(-1)
            - Normal(mu[:, None], std[:, None]).log_prob(z).sum(-1)
        )
        given = model.log_importance_weights(x, noise, posterior=(mu, logvar))[0]
    assert log_w.shape == log_px_z.shape == (5, 7)
    torch.testing.assert_close(log_px_z, expected_px_z)
    torch.testing.assert_close(log_w, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(given, log_w)


def test_iwae_converges_with_a_wrong_posterior_and_k1_is_the_elbo():
    model, w, b, s = linear_gaussian_vae()
    encoder = model.encoder.net[0]
    with torch.no_grad():  # a worse posterior: shifted, rotated means and too wide
        encoder.weight[:2] += 0.05 * torch.randn(2, 6, generator=seeded(4))
        encoder.bias[:2] += 0.2
        encoder.bias[2:] += 0.7  # twice the variance: heavier tails than p(z | x), finite Var(w)
    x = sample_images(w, b, 256)
    log_px = closed_form_log_px(x, w, b)

    # The exact ELBO is log p(x) - KL(q(z | x) || p(z | x)); both Gaussians, q's diagonal.
    with torch.no_grad():
        mu_q, logvar_q = (t.double() for t in model.posterior(x))
    x_flat = x.double().flatten(1)
    true_mean = (x_flat - b) @ w * s / SIGMA**2  # (256, 2)
    var_ratio = logvar_q.exp() / s
    gap = 0.5 * (var_ratio + (mu_q - true_mean).square() / s - 1 - var_ratio.log()).sum(1)
    assert gap.mean() > 0.4  # the perturbation matters

    # A single-sample estimate has mean log p(x) - gap and std ~1.6 per image: ~0.1 over 256.
    one_sample = iwae_log_likelihood(model, x, k=1, max_batch_elems=BIG, generator=seeded())
    assert one_sample.mean() < log_px.mean() - 0.25

    result = evaluate_vae(model, [x], k=20000, max_batch_elems=BIG, generator=seeded())
    # Mean log-weight over 20000 samples: the exact ELBO up to Monte Carlo error (~1e-3 here).
    assert result["elbo"] == pytest.approx(float((log_px - gap).mean()), abs=0.005)
    # IWAE with 20000 samples: bias ~ Var(w) / (2 K p(x)^2), noise ~5e-3 per image.
    estimate = iwae_log_likelihood(model, x, k=20000, max_batch_elems=BIG, generator=seeded(5))
    torch.testing.assert_close(estimate, log_px, rtol=0, atol=0.03)
    assert float((estimate - log_px).mean()) == pytest.approx(0, abs=0.003)
    # A Gaussian density: a log-density of real-valued pixels, so no bits per dimension.
    assert result["log_px_is"] == "density" and result["bpd"] is None


@pytest.fixture(scope="module")
def trained_vae(trained_runs):
    """The session's small trained VAE and its test split (359 digits)."""
    model, cfg = load_run(trained_runs("vae"))
    x, _ = load_split(load_data(cfg), "test")
    return model, x


def test_iwae_increases_with_k_and_bounds_the_elbo_on_a_trained_vae(trained_vae):
    model, x = trained_vae
    torch.manual_seed(0)
    means = [
        float(iwae_log_likelihood(model, x, k, max_batch_elems=BIG, generator=seeded()).mean())
        for k in (1, 10, 100, 1000)
    ]
    assert means == sorted(set(means)), means  # strictly increasing: K = 1, 10, 100, 1000

    result = evaluate_vae(
        model, [x[:200], x[200:]], k=1000, max_batch_elems=BIG, generator=seeded()
    )
    assert result["num_images"] == len(x) and result["log_px_k"] == 1000
    assert result["log_px"] == pytest.approx(means[-1], abs=0.05)  # other samples, same K
    assert result["log_px"] >= result["elbo"]
    # The MC average of log p(z) - log q(z | x) over 1000 samples is minus the analytic KL.
    assert result["elbo"] == pytest.approx(-(result["recon"] + result["kl"]), abs=0.05)
    # The training-time test ELBO (one sample per image) estimates the same quantity.
    with torch.no_grad():
        terms = model.loss(x)
    assert result["kl"] == pytest.approx(float(terms["kl"]), rel=1e-5)
    assert result["elbo"] == pytest.approx(float(terms["elbo"]), abs=0.5)
    assert result["bpd"] == pytest.approx(-result["log_px"] / (64 * math.log(2)), rel=1e-12)


def test_bounds_from_log_weights():
    log_w = torch.tensor(
        [[0.0, 2.0, -1.0, 3.0, 5.0], [1.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64
    )
    bounds = bounds_from_log_weights(log_w, [1, 2, 5])
    assert bounds[1].tolist() == pytest.approx(log_w.mean(1).tolist())  # the ELBO
    assert bounds[5].tolist() == pytest.approx((torch.logsumexp(log_w, 1) - math.log(5)).tolist())
    pairs = torch.logsumexp(log_w[:, :4].reshape(2, 2, 2), 2) - math.log(2)  # the 5th left out
    assert bounds[2].tolist() == pytest.approx(pairs.mean(1).tolist())
    assert bounds[2][1] == pytest.approx(1.0)  # equal weights: every bound is the weight
    with pytest.raises(ValueError, match=r"in \[1, 5\], got 6"):
        bounds_from_log_weights(log_w, [6])
    assert bound_sample_counts(5000) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
    assert bound_sample_counts(50, model_k=30) == [1, 2, 5, 10, 20, 30]
    assert bound_sample_counts(1) == [] and bound_sample_counts(10, model_k=10) == [1, 2, 5]


def test_posterior_gap_and_the_bounds_shrink_with_k(trained_vae):
    """log p(x) - ELBO is the posterior gap, and log p(x) - L_j shrinks with j to 0 (Burda et
    al.'s theorem 1), on a trained VAE; bound_gap is the gap of the model's own training bound."""
    model, x = trained_vae
    result = evaluate_vae(
        model, [x[:200], x[200:]], k=1000, max_batch_elems=BIG, generator=seeded()
    )
    assert result["posterior_gap"] == pytest.approx(result["log_px"] - result["elbo"], abs=1e-12)
    assert result["posterior_gap"] > 0
    bounds = result["bounds"]
    assert list(bounds) == [1, 2, 5, 10, 20, 50, 100, 200, 500]
    assert bounds[1] == pytest.approx(result["elbo"], abs=1e-9)  # the same samples, j = 1
    gaps = [result["log_px"] - bound for bound in bounds.values()]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] > 0, gaps  # strictly shrinking
    assert gaps[-1] < gaps[0] / 5
    assert result["bound_gap"] == pytest.approx(result["posterior_gap"], abs=1e-9)  # k=1: ELBO

    model.k = 5  # as an IWAE run with model.k=5: the gap of its own bound L_5
    try:
        iwae = evaluate_vae(model, [x], k=100, max_batch_elems=BIG, generator=seeded())
    finally:
        model.k = 1
    assert iwae["bound_gap"] == pytest.approx(iwae["log_px"] - iwae["bounds"][5], abs=1e-12)
    assert 0 < iwae["bound_gap"] < iwae["posterior_gap"]
    one = evaluate_vae(model, [x[:10]], k=1, max_batch_elems=BIG, generator=seeded())
    assert one["bounds"] == {} and math.isnan(one["bound_gap"]) and one["posterior_gap"] == 0


def test_chunking_does_not_change_the_estimate(trained_vae):
    model, x = trained_vae
    x = x[:10]  # 64 pixels each
    calls: list[int] = []
    # Record decoder calls of more than one row (one-row calls measure the decoder's widest layer).
    hook = model.decoder.register_forward_hook(
        lambda m, i, out: calls.append(out.numel()) if len(out) > 1 else None
    )
    try:
        results = {}
        # budget -> decoder calls: all at once; 7 samples of one image per call (9 calls per
        # image); 3 images x all 60 samples per call (4 calls)
        for budget, num_calls in ((BIG, 1), (7 * 64, 10 * 9), (3 * 60 * 64, 4)):
            calls.clear()
            results[budget] = iwae_log_likelihood(model, x, 60, budget, generator=seeded())
            assert len(calls) == num_calls and max(calls) <= budget
    finally:
        hook.remove()
    for budget in (7 * 64, 3 * 60 * 64):
        torch.testing.assert_close(results[budget], results[BIG], rtol=1e-6, atol=1e-5)
    # A different seed gives different samples (the comparison above is not vacuous).
    other = iwae_log_likelihood(model, x, 60, BIG, generator=seeded(1))
    assert (other - results[BIG]).abs().max() > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_with_a_cpu_generator(trained_vae):
    model, x = trained_vae
    cpu = iwae_log_likelihood(model, x, 500, BIG, generator=seeded())
    model_cuda = model.to("cuda")
    try:
        cuda = iwae_log_likelihood(model_cuda, x, 500, 2**16, generator=seeded())
    finally:
        model.to("cpu")
    assert cuda.device.type == "cuda"
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-5, atol=1e-4)


def test_bits_per_dim():
    assert bits_per_dim(-3 * 64 * math.log(2), 64) == pytest.approx(3)
    assert bits_per_dim(-3 * 64 * math.log(2), 64, bit_depth=8) == pytest.approx(11)
    # The +8 is the discretisation: a density p on [0, 1] puts mass ~ p(x) / 256 on an 8-bit
    # bin of width 1/256, so -log2(mass) = -log2 p(x) + 8. Check with the Gaussian CDF.
    normal = Normal(torch.tensor(0.4, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64))
    x = torch.tensor(0.43, dtype=torch.float64)
    mass = normal.cdf(x + 1 / 512) - normal.cdf(x - 1 / 512)
    bpd = bits_per_dim(float(normal.log_prob(x)), 1, bit_depth=8)
    assert bpd == pytest.approx(float(-mass.log2()), abs=1e-4)


def test_active_units():
    scales = torch.tensor([1.0, 0.2, 0.05, 0.0])  # variances 1, 0.04, 0.0025, 0
    means = torch.randn(2000, 4, generator=seeded()) * scales + 3.0
    assert count_active_units(means) == 2
    assert count_active_units(means, threshold=0.001) == 3
    with pytest.raises(ValueError, match="N >= 2"):
        count_active_units(means[:1])

    # Through evaluate_vae: unit 0's posterior mean is x_0 (variance 1 over the data), unit 1's
    # is 0.05 x_0 (variance 0.0025); the posterior variances (here huge) do not count.
    model, *_ = linear_gaussian_vae()
    encoder = model.encoder.net[0]
    with torch.no_grad():
        encoder.weight.zero_()
        encoder.weight[0, 0], encoder.weight[1, 0] = 1.0, 0.05
        encoder.bias.zero_()
        encoder.bias[2:] = 2.0
    x = torch.randn(500, *IMAGE_SHAPE, generator=seeded())
    assert evaluate_vae(model, [x], k=2, max_batch_elems=BIG)["active_units"] == 1


def test_needs_a_vae():
    ae = Autoencoder(IMAGE_SHAPE, latent_dim=2, network=Linear(), likelihood=SquaredError())
    x = torch.rand(4, *IMAGE_SHAPE)
    with pytest.raises(ValueError, match="needs a VAE.*Autoencoder"):
        iwae_log_likelihood(ae, x, k=5, max_batch_elems=BIG)
    with pytest.raises(ValueError, match="needs a VAE.*Autoencoder"):
        evaluate_vae(ae, [x], k=5, max_batch_elems=BIG)


def run_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    command = [sys.executable, str(REPO_ROOT / "scripts" / "evaluate.py"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def outputs_of(done: subprocess.CompletedProcess) -> Path:
    """The folder a command's call wrote into, from its last line ("... outputs are in DIR")."""
    return Path(done.stdout.strip().splitlines()[-1].rsplit(" are in ", 1)[1])


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and modification time (ns)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_evaluate_command_end_to_end(trained_runs, tmp_path):
    run = shutil.copytree(trained_runs("vae"), tmp_path / "run")  # leave the shared run alone
    config_before = (run / "config.yaml").read_bytes()
    metrics_before = read_metrics(run)
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    done = run_script([f"run={run}", "k=50"], cwd)
    assert done.returncode == 0, done.stderr
    assert "log p(x), IWAE k=50" in done.stdout
    assert "posterior gap" in done.stdout and "log p(x) - L_j, j samples" in done.stdout
    # A second evaluation (what main() runs, in process), with settings that name the same
    # folder: every file of the first stays as it was, and metrics.json holds the latest.
    from hydra import compose, initialize_config_dir

    from vae_experiments.cli.evaluate import UsageError, evaluate
    from vae_experiments.configs import CONFIG_DIR

    first, metrics_first = snapshot(run / "analysis"), read_metrics(run)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        overrides = [f"run={run}", "k=50", "seed=1", "device=cpu", "max_images=100"]
        cfg = compose("evaluate", overrides=overrides)
    second = evaluate(cfg)  # the first 100 images
    after = snapshot(run / "analysis")
    assert {name: after.get(name) for name in first} == first
    assert second["seed"] == 1 and read_metrics(run)["test/log_px"] == second["metrics"]["log_px"]
    assert (run / "analysis" / "evaluate-best-test-k50_1" / "evaluate_test.json").is_file()
    assert second["metrics"]["num_images"] == 100 == read_metrics(run)["test/log_px_images"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"run={run}", "max_images=0"])
    with pytest.raises(UsageError, match="max_images must be null .* got max_images=0"):
        evaluate(cfg)

    metrics = metrics_first
    for key, value in metrics_before.items():  # kept, training's test/elbo included
        assert metrics[key] == value
    added = {
        *("test/log_px", "test/log_px_k", "test/log_px_images", "test/bpd", "test/active_units"),
        *("test/posterior_gap", "test/bound_gap"),
    }
    assert set(metrics) == set(metrics_before) | added
    assert metrics["test/log_px_k"] == 50
    assert metrics["test/log_px"] < 0 and metrics["test/bpd"] > 0
    out = outputs_of(done)  # this call's own folder, named after what made it
    assert out == run / "analysis" / "evaluate-best-test-k50"
    record = json.loads((out / "evaluate_test.json").read_text())
    assert record["metrics"]["num_images"] == 359
    assert record["metrics"]["log_px"] == metrics["test/log_px"]
    assert record["metrics"]["log_px"] >= record["metrics"]["elbo"]
    assert metrics["test/log_px_images"] == 359
    gap = record["metrics"]["log_px"] - record["metrics"]["elbo"]
    assert metrics["test/posterior_gap"] == pytest.approx(gap) == metrics["test/bound_gap"]
    assert list(record["metrics"]["bounds"]) == ["1", "2", "5", "10", "20"]  # JSON keys
    assert record["k"] == 50 and record["checkpoint"].endswith("best.ckpt")

    assert (run / "config.yaml").read_bytes() == config_before
    assert (out / "evaluate.log").is_file()
    assert f"run={run}" in (out / "evaluate.yaml").read_text()  # what made it
    assert list(cwd.iterdir()) == []  # no outputs/ (or anything else) where it was run

    events = EventAccumulator(str(tensorboard_dir(run)))  # the run directory itself
    events.Reload()
    assert {unit_tag(tag, "discretized_logistic") for tag in added} <= set(events.Tags()["scalars"])
    # Both evaluations' points are at the step training ended; the latest, by their own step and
    # wall time, is metrics.json's; and it is the one read last, as TensorBoard keeps it.
    points = events.Scalars("test/log_px [discretized_logistic]")
    latest = max(points, key=lambda point: (point.step, point.wall_time))
    assert [point.step for point in points] == [metrics_before["steps"]] * 2
    assert latest.value == pytest.approx(read_metrics(run)["test/log_px"])
    assert points[-1] == latest


def test_a_new_event_file_sorts_after_one_made_in_the_same_second(tmp_path):
    """TensorBoard reads event files in name order (second, host, process id) and keeps the
    point read last at a step: an evaluation's file must sort after an earlier one's."""
    from torch.utils.tensorboard import SummaryWriter

    earlier = tmp_path / f"events.out.tfevents.{int(time.time())}.zzz-host.99999.0"
    earlier.write_bytes(b"")
    after_earlier_event_files(tmp_path)
    with SummaryWriter(str(tmp_path)) as writer:
        writer.add_scalar("test/log_px", 1.0, 40)
    assert sorted(tmp_path.glob(EVENT_FILE_GLOB))[0] == earlier


@pytest.mark.slow  # a subprocess for one message
def test_evaluate_command_needs_a_run(tmp_path):
    done = run_script([], tmp_path)
    assert done.returncode != 0
    assert "needs run=<run directory or checkpoint>" in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a subprocess for one message
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_evaluate_on_cuda_without_a_gpu_says_what_to_use(trained_runs, tmp_path):
    done = run_script([f"run={trained_runs('vae')}", "device=cuda", "k=2"], tmp_path)
    assert done.returncode != 0
    assert "device=cuda: torch sees no GPU on this machine; use device=cpu" in done.stderr
    assert "map_location" not in done.stderr


def test_the_table_says_how_many_samples_training_used():
    """An IWAE k=5 run's logged test/elbo averages five samples per image, and its objective is
    the k=5 bound: the table must not call it a one-sample ELBO."""
    from vae_experiments.cli.evaluate import format_table

    results = {
        "log_px_k": 100,
        "log_px": -90.0,
        "elbo": -95.0,
        "posterior_gap": 5.0,
        "recon": 80.0,
        "kl": 15.0,
        "bpd": 0.17,
        "log_px_is": "likelihood",
        "log_px_note": "a likelihood",
        "active_units": 3,
        "latent_dims": [4],
        "bounds": {},
    }
    training = {"test/elbo": -96.0, "test/iwae_bound": -93.0}
    iwae = format_table(results, training, "test", training_k=5)
    assert "5 samples per image" in iwae and "one sample" not in iwae
    assert "training's test/iwae_bound" in iwae and "IWAE k=5" in iwae
    vae = format_table(results, {"test/elbo": -96.0}, "test", training_k=1)
    assert "one sample per image" in vae and "iwae_bound" not in vae
