"""β-TCVAE, β-VAE with capacity annealing and FactorVAE: each objective against an independent
computation, and the training of a model with an adversary (two optimizers): each steps only its
own parameters, resume is exact, signals stop it, and what it cannot train with is refused."""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import FAST, REPO_ROOT, compose_config, train_run
from tests.test_resume import assert_same_training, checkpoint
from vae_experiments.models import MLP, VAE, Bernoulli, BetaTCVAE, CapacityVAE, FactorVAE
from vae_experiments.models.adversary import ADVERSARY_LOSS, split_parameters
from vae_experiments.models.disentangling import mws_kl_terms, permute_dims
from vae_experiments.training import train
from vae_experiments.training.interrupt import Interruption, RunInterrupted
from vae_experiments.training.module import LitModel

IMAGE_SHAPE = (1, 8, 8)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def adam(lr: float = 1e-3, betas=(0.9, 0.999)):
    return functools.partial(torch.optim.Adam, lr=lr, betas=betas)


def btcvae(alpha=1.0, beta=6.0, gamma=1.0, dataset_size=100) -> BetaTCVAE:
    return BetaTCVAE(IMAGE_SHAPE, 3, MLP([16]), Bernoulli(), dataset_size, alpha, beta, gamma)


def factorvae(gamma=35.0, dims=(16, 16)) -> FactorVAE:
    return FactorVAE(IMAGE_SHAPE, 3, MLP([16]), Bernoulli(), gamma, list(dims), adam(1e-2))


# --- β-TCVAE ----------------------------------------------------------------------------------


def normal_log_density(value, mean, logvar) -> float:
    value, mean, logvar = float(value), float(mean), float(logvar)
    return -0.5 * (math.log(2 * math.pi) + logvar + (value - mean) ** 2 / math.exp(logvar))


def test_the_mws_split_matches_explicit_loops_and_sums_to_the_sampled_kl():
    """Chen et al.'s minibatch-weighted sampling, written out with loops over codes, images
    and dimensions: log q(z_i) ~ log sum_j q(z_i | x_j) - log(N B), and each marginal alike."""
    batch, dims, size = 5, 3, 1000
    mu, logvar = torch.randn(batch, dims, dtype=torch.float64), torch.randn(batch, dims).double()
    noise = torch.randn(batch, dims, dtype=torch.float64)
    z = mu + torch.exp(0.5 * logvar) * noise
    log_qz_x = torch.tensor(
        [
            sum(normal_log_density(z[i, d], mu[i, d], logvar[i, d]) for d in range(dims))
            for i in range(batch)
        ],
        dtype=torch.float64,
    )
    terms = mws_kl_terms(z, mu, logvar, log_qz_x, size)

    for i in range(batch):
        joint = [
            math.exp(sum(normal_log_density(z[i, d], mu[j, d], logvar[j, d]) for d in range(dims)))
            for j in range(batch)
        ]
        log_qz = math.log(sum(joint) / (size * batch))
        log_marginals = [
            math.log(
                sum(
                    math.exp(normal_log_density(z[i, d], mu[j, d], logvar[j, d]))
                    for j in range(batch)
                )
                / (size * batch)
            )
            for d in range(dims)
        ]
        log_pz = sum(normal_log_density(z[i, d], 0.0, 0.0) for d in range(dims))
        assert terms["mi"][i].item() == pytest.approx(log_qz_x[i].item() - log_qz, abs=1e-9)
        assert terms["tc"][i].item() == pytest.approx(log_qz - sum(log_marginals), abs=1e-9)
        assert terms["dim_kl"][i].item() == pytest.approx(sum(log_marginals) - log_pz, abs=1e-9)
        # MI + TC + dimension-wise KL = log q(z | x) - log p(z), the sampled KL, whatever N.
        total = terms["mi"][i] + terms["tc"][i] + terms["dim_kl"][i]
        assert total.item() == pytest.approx(log_qz_x[i].item() - log_pz, abs=1e-9)


def test_btcvae_with_unit_weights_is_the_vae_loss_in_expectation():
    """alpha = beta = gamma = 1: loss - recon is the one-sample KL, whose mean over many draws is
    the VAE's analytic KL; the reconstruction term is the VAE's for the same weights."""
    model = btcvae(alpha=1.0, beta=1.0, gamma=1.0)
    vae = VAE(IMAGE_SHAPE, 3, MLP([16]), Bernoulli(), 1.0, 0)
    vae.load_state_dict(model.state_dict())
    x = torch.rand(16, *IMAGE_SHAPE).round()
    sampled_kl, vae_losses, losses = [], [], []
    for _ in range(300):
        terms = model.loss(x)
        sampled_kl.append((terms["loss"] - terms["recon"]).item())
        losses.append(terms["loss"].item())
        vae_losses.append(vae.loss(x)["loss"].item())
        # The split sums to the sampled KL, so the weighted loss is recon + that KL.
        split = terms["mi"] + terms["tc"] + terms["dim_kl"]
        torch.testing.assert_close(split, terms["loss"] - terms["recon"], atol=1e-4, rtol=0)
    kl = vae.loss(x)["kl"].item()  # analytic: the same whatever the draw
    spread = torch.tensor(sampled_kl).std().item() / math.sqrt(len(sampled_kl))
    assert abs(sum(sampled_kl) / len(sampled_kl) - kl) < 4 * spread + 1e-6
    loss_spread = (torch.tensor(losses).std() + torch.tensor(vae_losses).std()).item()
    mean_gap = (sum(losses) - sum(vae_losses)) / len(losses)
    assert abs(mean_gap) < 4 * loss_spread / math.sqrt(len(losses))


def test_btcvae_weights_its_terms_and_monitor_changes_no_loss():
    model = btcvae(alpha=0.5, beta=6.0, gamma=2.0)
    x = torch.rand(8, *IMAGE_SHAPE).round()
    torch.manual_seed(1)
    terms = model.loss(x)
    torch.manual_seed(1)
    quiet = model.loss(x, monitor=False)
    assert torch.equal(terms["loss"], quiet["loss"]) and "recon_mse" not in quiet
    expected = terms["recon"] + 0.5 * terms["mi"] + 6.0 * terms["tc"] + 2.0 * terms["dim_kl"]
    torch.testing.assert_close(terms["loss"], expected)
    torch.testing.assert_close(terms["elbo"], -(terms["recon"] + terms["kl"]))  # analytic KL


def test_btcvae_refuses_a_dataset_size_below_one():
    from vae_experiments.targets import ConfigError

    with pytest.raises(ConfigError, match="dataset_size=0 is invalid"):
        btcvae(dataset_size=0)


def test_the_beta_vae_preset_is_the_vae_with_beta_4_and_its_networks_swappable():
    """``model=beta_vae`` (one sweep compares it with btcvae, factorvae) is ``model=vae
    model.beta=4 model.latent_dim=10``, and ``model/network=`` still reaches its network."""
    preset = compose_config(["model=beta_vae", "model/network=mlp"]).model
    by_keys = compose_config(
        ["model=vae", "model.beta=4", "model.latent_dim=10", "model/network=mlp"]
    ).model
    assert OmegaConf.to_container(preset) == OmegaConf.to_container(by_keys)
    assert preset.network._target_.endswith(".MLP")


# --- β-VAE with capacity annealing ------------------------------------------------------------


def test_capacity_rises_linearly_and_the_loss_is_gamma_times_the_distance():
    model = CapacityVAE(IMAGE_SHAPE, 3, MLP([16]), Bernoulli(), 1000.0, 25.0, 100)
    assert [model.capacity(s) for s in (0, 50, 100, 1000, None)] == [0.0, 12.5, 25.0, 25.0, 25.0]
    x = torch.rand(8, *IMAGE_SHAPE).round()
    terms = model.loss(x, step=50)
    expected = terms["recon"] + 1000.0 * (terms["kl"] - 12.5).abs()
    torch.testing.assert_close(terms["loss"], expected)
    assert terms["capacity"] == 12.5
    torch.testing.assert_close(terms["elbo"], -(terms["recon"] + terms["kl"]))


# --- FactorVAE --------------------------------------------------------------------------------


def test_permute_dims_permutes_each_dimension_independently_across_the_batch():
    z = torch.arange(64 * 4, dtype=torch.float32).view(64, 4)  # every value distinct
    permuted = permute_dims(z)
    for d in range(4):  # each column holds its own values, reordered
        assert torch.equal(permuted[:, d].sort().values, z[:, d])
    rows = (permuted - torch.arange(4)) / 4  # the row each value came from, per column
    assert not torch.equal(rows[:, 0], torch.arange(64.0))  # moved
    orders = {tuple(rows[:, d].long().tolist()) for d in range(4)}
    assert len(orders) == 4  # a permutation of its own per dimension


def test_the_discriminator_estimates_the_total_correlation_of_correlated_codes():
    """Codes from a 2-d Gaussian with correlation rho have TC = -log(1 - rho^2) / 2; the
    discriminator trained on them against permuted codes (the model's own loss) estimates it
    by its mean logit (the density-ratio trick)."""
    rho = 0.9
    true_tc = -0.5 * math.log(1 - rho**2)  # 0.83 nats
    model = FactorVAE(IMAGE_SHAPE, 2, MLP([8]), Bernoulli(), 1.0, [64, 64], adam())
    optimizer = torch.optim.Adam(model.adversary_parameters(), lr=3e-3)
    mix = torch.tensor([[1.0, 0.0], [rho, math.sqrt(1 - rho**2)]])
    for _ in range(600):
        z = torch.randn(512, 2) @ mix.T
        optimizer.zero_grad()
        model.discriminator_loss(z).backward()
        optimizer.step()
    with torch.no_grad():
        z = torch.randn(20000, 2) @ mix.T
        estimate = model.discriminator(z).mean().item()
        independent = model.discriminator(torch.randn(20000, 2)).mean().item()
    assert estimate == pytest.approx(true_tc, abs=0.2)
    assert independent < estimate - 0.5  # codes with independent dimensions score lower


def test_factorvae_terms_and_its_parameter_groups():
    model = factorvae(gamma=10.0)
    own, adversary = split_parameters(model)
    assert {id(p) for p in adversary} == {id(p) for p in model.discriminator.parameters()}
    assert len(own) + len(adversary) == len(list(model.parameters()))
    x = torch.rand(8, *IMAGE_SHAPE).round()
    terms = model.loss(x)
    expected = terms["recon"] + terms["kl"] + 10.0 * terms["tc"]
    torch.testing.assert_close(terms["loss"], expected)
    torch.testing.assert_close(terms["elbo"], -(terms["recon"] + terms["kl"]))
    # The adversary's loss reaches only the discriminator (its codes are detached).
    terms[ADVERSARY_LOSS].backward()
    assert all(p.grad is None for p in own)
    assert all(p.grad is not None for p in adversary)
    with pytest.raises(ValueError, match="at least 2 images"):
        model.loss(x[:1])


class StepSpy(pl.Callback):
    """Records, for each optimizer step, which parameters it changed."""

    def __init__(self) -> None:
        self.changed: list[tuple[int, set[int]]] = []

    def on_train_start(self, trainer, pl_module):
        parameters = list(pl_module.parameters())
        for index, optimizer in enumerate(trainer.optimizers):
            original = optimizer.step

            def step(*args, _index=index, _original=original, **kwargs):
                before = [p.detach().clone() for p in parameters]
                result = _original(*args, **kwargs)
                changed = {
                    id(p)
                    for p, old in zip(parameters, before, strict=True)
                    if not torch.equal(p, old)
                }
                self.changed.append((_index, changed))
                return result

            optimizer.step = step


def test_each_optimizer_steps_only_its_own_parameters_and_a_batch_is_one_global_step():
    model = factorvae()
    module = LitModel(model, adam())
    assert not module.automatic_optimization
    data = TensorDataset(torch.rand(24, *IMAGE_SHAPE).round(), torch.zeros(24, dtype=torch.long))
    spy = StepSpy()
    trainer = pl.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[spy],
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    own, adversary = (set(map(id, group)) for group in split_parameters(model))
    assert [index for index, _ in spy.changed] == [0, 1, 0, 1, 0, 1]  # the model's step first
    for index, changed in spy.changed:
        assert changed == (own if index == 0 else adversary)
    assert trainer.global_step == 3  # batches, not optimizer steps


# --- training from the config: refusals, resume, signals --------------------------------------

SMALL_FACTORVAE = [
    "model=factorvae",
    "model/network=mlp",
    "model.network.hidden_dims=[32]",
    "model.discriminator_dims=[32,32]",
    "data.binarize=dynamic",
    "logger=none",
]
STEPS_PER_EPOCH = 1294 // 32


def run_train_py(*arguments: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), *arguments],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def test_what_a_model_with_an_adversary_cannot_train_with_is_refused_by_name(tmp_path):
    result = run_train_py(
        "model=factorvae",
        "scheduler=cosine",
        "trainer.gradient_clip_val=1.0",
        "trainer.precision=16-mixed",
        "data.batch_size=1",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    error = result.stderr.strip()
    assert error.startswith("error: 4 invalid config values:"), error
    for key in (
        "scheduler.scheduler._target_=",
        "trainer.gradient_clip_val=1.0",
        "trainer.precision=16-mixed",
        "data.batch_size=1",
    ):
        assert f"\n  {key}" in error
    assert "use scheduler=none" in error and "FactorVAE has an adversary" in error
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture(scope="module")
def straight_factorvae(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("straight") / "run", SMALL_FACTORVAE)


def test_factorvae_checkpoints_both_optimizers_and_resumes_exactly(tmp_path, straight_factorvae):
    last = checkpoint(straight_factorvae)
    assert last["global_step"] == 2 * STEPS_PER_EPOCH  # batches, not optimizer steps
    states = last["optimizer_states"]
    assert len(states) == 2
    model_steps = {int(s["step"]) for s in states[0]["state"].values()}
    adversary_steps = {int(s["step"]) for s in states[1]["state"].values()}
    assert model_steps == adversary_steps == {2 * STEPS_PER_EPOCH}
    assert states[1]["param_groups"][0]["betas"] == (0.5, 0.9)
    assert states[1]["param_groups"][0]["lr"] == 1e-4

    run_dir = train_run(tmp_path / "run", [*SMALL_FACTORVAE, "trainer.max_epochs=1"])
    assert checkpoint(run_dir)["global_step"] == STEPS_PER_EPOCH
    train(
        compose_config([*FAST, *SMALL_FACTORVAE]),
        run_dir,
        ckpt_path=run_dir / "checkpoints/last.ckpt",
    )
    assert_same_training(straight_factorvae, run_dir)


def test_a_signal_stops_factorvae_with_a_checkpoint_that_resumes_exactly(
    tmp_path, straight_factorvae, monkeypatch
):
    stop_step = STEPS_PER_EPOCH + 5

    def send_sigterm(self, trainer, *args):
        if trainer.global_step == stop_step:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Interruption, "on_train_batch_end", send_sigterm, raising=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(RunInterrupted) as stopped:
        train(compose_config([*FAST, *SMALL_FACTORVAE]), run_dir)
    assert stopped.value.signal_name == "SIGTERM" and stopped.value.step == stop_step
    assert checkpoint(run_dir)["global_step"] == stop_step
    assert len(checkpoint(run_dir)["optimizer_states"]) == 2

    monkeypatch.undo()
    train(
        compose_config([*FAST, *SMALL_FACTORVAE]),
        run_dir,
        ckpt_path=run_dir / "checkpoints/last.ckpt",
    )
    assert_same_training(straight_factorvae, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model",
    [
        ["model=btcvae"],
        ["model=factorvae", "model.discriminator_dims=[64,64]"],
        ["model=beta_vae_capacity"],
    ],
    ids=lambda overrides: overrides[0],
)
def test_each_objective_trains_from_the_command_line_on_digits(tmp_path, model):
    run_dir = tmp_path / "run"
    result = run_train_py(
        *model,
        "model/network=mlp",
        "model.network.hidden_dims=[64]",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = OmegaConf.load(run_dir / "config.yaml")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert all(math.isfinite(value) for value in metrics.values())
    assert metrics["steps"] == 1294 // 64
    if model[0] == "model=btcvae":
        assert config.model.dataset_size == 1294  # digits' training split, from the data
        assert {"test/mi", "test/tc", "test/dim_kl", "test/elbo"} <= set(metrics)
    if model[0] == "model=factorvae":
        assert {"test/tc", "test/adversary_loss"} <= set(metrics)
        assert (
            "one step per pass of Lightning's loop, as the model has an adversary"
            in (run_dir / "train.log").read_text()
        )
    if model[0] == "model=beta_vae_capacity":
        assert metrics["test/capacity"] == 25.0


@pytest.mark.slow  # reads the data and builds the trainer first: up to a minute on a busy CPU
def test_a_model_with_an_adversary_is_refused_several_processes(tmp_path):
    result = run_train_py(
        "model=factorvae",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: trainer.devices=2 is invalid: FactorVAE has an adversary and trains in one "
        "process (DDP would not synchronise its two backward passes per step): use trainer=cpu "
        "or trainer.devices=1"
    )
    assert not (tmp_path / "run").exists()  # nothing left that blocks the corrected command


@pytest.mark.slow
def test_ctrl_c_stops_factorvae_and_resume_finishes_it(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [
            sys.executable,
            str(REPO_ROOT / "train.py"),
            *FAST,
            *SMALL_FACTORVAE,
            "trainer.max_epochs=6",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "checkpoints" / "last.ckpt").is_file():
            assert process.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGINT
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted" and status["signal"] == "SIGINT"
    assert checkpoint(run_dir)["global_step"] == status["step"] < 6 * STEPS_PER_EPOCH
    assert len(checkpoint(run_dir)["optimizer_states"]) == 2

    resumed = run_train_py(f"resume={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    straight = train_run(tmp_path / "straight", [*SMALL_FACTORVAE, "trainer.max_epochs=6"])
    assert_same_training(straight, run_dir)
