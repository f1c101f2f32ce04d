"""The VQ-VAE and its priors over code grids: quantisation, straight-through gradients, codebook
updates, the PixelCNN's causality, and both stages of a run on digits (train, fit, load, sample)."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIG_DIR, REPO_ROOT, compose_config, small_model_config, train_run
from vae_experiments.analysis.code_prior import code_usage, fit_code_priors, prior_metrics
from vae_experiments.models import VQVAE
from vae_experiments.models.code_priors import (
    CodeFrequencies,
    Frequencies,
    GatedPixelCNN,
    PixelCNN,
    bits_per_code,
)
from vae_experiments.models.quantizer import VectorQuantizer
from vae_experiments.runs import load_run, read_metrics
from vae_experiments.runs.load import check_checkpoint
from vae_experiments.runs.priors import read_prior_record, save_prior
from vae_experiments.targets import ConfigError, instantiate

IMAGE_SHAPE = (1, 8, 8)
# A small VQ-VAE and prior: a run on digits takes seconds.
SMALL = [
    "model=vqvae",
    "model.network.channels=[8,16]",
    "model.num_codes=16",
    "model.prior.channels=8",
    "model.prior.layers=2",
    "model.prior.epochs=3",
    "model.prior.lr=0.01",
]
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}


def command(argv: list[str]) -> subprocess.CompletedProcess:
    """Runs ``python <argv>`` in the repository as a user does, with this checkout first."""
    return subprocess.run(
        [sys.executable, *argv], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def vqvae(overrides=(), image_shape=IMAGE_SHAPE, small=True) -> VQVAE:
    """The VQ-VAE of ``model=vqvae`` (with SMALL's sizes unless ``small`` is false: overrides
    that choose another network or prior) for ``image_shape``."""
    cfg = compose_config([*(SMALL if small else ["model=vqvae"]), *overrides])
    return instantiate(small_model_config(cfg.model), key="model", image_shape=list(image_shape))


# --- quantisation ------------------------------------------------------------------------------


def test_quantisation_picks_the_nearest_code():
    quantizer = VectorQuantizer(num_codes=10, code_dim=3, ema_decay=None, dead_code_steps=None)
    with torch.no_grad():
        quantizer.codebook.normal_()
    z_e = torch.randn(4, 3, 5, 6)
    out = quantizer.eval()(z_e)
    vectors = z_e.permute(0, 2, 3, 1).reshape(-1, 3)
    nearest = torch.cdist(vectors, quantizer.codebook).argmin(1)  # an independent computation
    assert torch.equal(out.codes, nearest.view(4, 5, 6))
    torch.testing.assert_close(out.straight_through, quantizer.lookup(out.codes))
    torch.testing.assert_close(
        out.commitment_loss, (out.straight_through - z_e).square().flatten(1).sum(1)
    )


def test_straight_through_passes_the_decoders_gradient_to_the_encoder_unchanged():
    quantizer = VectorQuantizer(num_codes=8, code_dim=4, ema_decay=None, dead_code_steps=None)
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = quantizer.eval()(z_e)
    upstream = torch.randn_like(z_e)  # what a decoder sends back
    (out.straight_through * upstream).sum().backward()
    assert torch.equal(z_e.grad, upstream)
    assert quantizer.codebook.grad is None  # only the codebook loss trains the codes


def test_the_codebook_loss_moves_codes_towards_their_encodings():
    quantizer = VectorQuantizer(num_codes=4, code_dim=2, ema_decay=None, dead_code_steps=None)
    z_e = torch.randn(8, 2, 2, 2, requires_grad=True)
    out = quantizer.train()(z_e)
    vectors = z_e.detach().permute(0, 2, 3, 1).reshape(-1, 2)
    used = out.codes.unique()

    def distance() -> torch.Tensor:  # each used code to the mean of its encodings
        return torch.stack(
            [
                (quantizer.codebook[k] - vectors[out.codes.flatten() == k].mean(0)).norm()
                for k in used
            ]
        )

    before = distance().detach()
    out.commitment_loss.sum().backward()
    assert quantizer.codebook.grad is None  # the commitment loss trains the encoder only
    optimizer = torch.optim.SGD(quantizer.parameters(), lr=0.01)
    out.codebook_loss.sum().backward()
    optimizer.step()
    assert (distance() < before).all()


def test_ema_updates_move_codes_to_the_mean_of_their_encodings():
    quantizer = VectorQuantizer(num_codes=4, code_dim=2, ema_decay=0.5, dead_code_steps=None)
    assert "codebook" not in dict(quantizer.named_parameters())
    z_e = torch.randn(16, 2, 1, 1)
    before = quantizer.codebook.clone()
    codes = quantizer.train()(z_e).codes.flatten()
    vectors = z_e.flatten(1)
    for k in codes.unique():
        mean = vectors[codes == k].mean(0)
        assert (quantizer.codebook[k] - mean).norm() < (before[k] - mean).norm()


@pytest.mark.parametrize("ema_decay", [None, 0.99])
def test_a_dead_code_is_restarted_at_an_encoder_output(ema_decay):
    quantizer = VectorQuantizer(num_codes=3, code_dim=2, ema_decay=ema_decay, dead_code_steps=2)
    with torch.no_grad():
        quantizer.codebook.copy_(torch.tensor([[0.0, 0.0], [0.1, 0.0], [100.0, 100.0]]))
        if ema_decay is not None:  # the codes are the moving sums over the counts (ones)
            quantizer.ema_sum.copy_(quantizer.codebook)
    z_e = torch.randn(6, 2, 2, 2) * 0.1  # all nearer codes 0 and 1 than code 2
    vectors = z_e.permute(0, 2, 3, 1).reshape(-1, 2)

    quantizer.eval()(z_e)  # evaluation counts nothing and restarts nothing
    assert quantizer.unused_steps.tolist() == [0, 0, 0]
    quantizer.train()(z_e)
    assert quantizer.unused_steps[2] == 1
    torch.testing.assert_close(
        quantizer.codebook[2], torch.tensor([100.0, 100.0]), rtol=1e-3, atol=0
    )
    quantizer(z_e)  # unused for 2 steps: restarted
    assert quantizer.unused_steps[2] == 0
    assert (quantizer.codebook[2] == vectors).all(1).any()  # one of this batch's encodings
    assert quantizer(z_e).codes_in_use >= 2


# --- priors over code grids ----------------------------------------------------------------------


def test_the_pixelcnn_sees_exactly_the_positions_before_each_one():
    """Each logit depends on the codes earlier in raster order, all of them (no blind spot),
    and on no other: checked by gradients through the embedding."""
    h, w = 4, 5
    # 16 channels: a position whose head's ReLUs were all off would see nothing, by chance.
    prior = GatedPixelCNN((h, w), num_codes=6, channels=16, layers=4, kernel_size=3)
    codes = torch.randint(0, 6, (2, h, w))
    embedded = prior.embedding(codes).detach().requires_grad_()

    class Fixed(torch.nn.Module):
        def forward(self, _codes):
            return embedded

    prior.embedding = Fixed()
    logits = prior(codes)  # (B, K, h, w)
    for i, j in itertools.product(range(h), range(w)):
        (grad,) = torch.autograd.grad(logits[:, :, i, j].sum(), embedded, retain_graph=True)
        seen = grad.abs().sum((0, 3)) > 0  # (h, w)
        earlier = torch.arange(h * w).view(h, w) < i * w + j
        assert torch.equal(seen, earlier), f"position {(i, j)} sees\n{seen.int()}"


@pytest.mark.parametrize("kind", ["pixelcnn", "frequencies"])
def test_each_prior_is_a_distribution_over_grids(kind):
    num_codes, grid = 3, (2, 2)
    codes = torch.randint(0, num_codes, (40, *grid))
    if kind == "pixelcnn":
        prior = PixelCNN(4, 2, 3, epochs=2, lr=0.01, batch_size=8).fit(codes, num_codes)
    else:
        prior = Frequencies(0.5).fit(codes, num_codes)
    every_grid = torch.tensor(list(itertools.product(range(num_codes), repeat=4))).view(-1, *grid)
    with torch.no_grad():
        total = prior.log_prob(every_grid).logsumexp(0)
    assert float(total) == pytest.approx(0.0, abs=1e-5)
    assert prior.sample(5).shape == (5, *grid)


def test_frequencies_are_the_smoothed_counts_at_each_position():
    codes = torch.tensor([[[0, 1]], [[0, 2]], [[1, 2]]])  # three 1x2 grids of 3 codes
    prior = CodeFrequencies((1, 2), 3, pseudo_count=0.5).fit(codes)
    # Position 0 saw codes 0, 0, 1; position 1 saw 1, 2, 2; each count + 0.5, over 3 + 1.5.
    expected = math.log(2.5 / 4.5) + math.log(2.5 / 4.5)
    assert float(prior.log_prob(torch.tensor([[[0, 2]]]))) == pytest.approx(expected)
    uniform = CodeFrequencies((1, 2), 8, pseudo_count=0.5)
    assert bits_per_code(uniform, codes) == pytest.approx(3.0)  # log2 8


def test_a_fitted_pixelcnn_beats_the_frequencies_on_dependent_codes():
    # Each grid repeats one random code: the frequencies see none of it, a PixelCNN all.
    codes = torch.randint(0, 4, (256, 1, 1)).expand(256, 3, 3).contiguous()
    fitted = PixelCNN(8, 2, 3, epochs=15, lr=0.01, batch_size=32).fit(codes, 4)
    frequencies = Frequencies(0.5).fit(codes, 4)
    assert bits_per_code(frequencies, codes) == pytest.approx(2.0, abs=0.05)
    assert bits_per_code(fitted, codes) < 0.8


# --- the model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ema_decay", [None, 0.99])
def test_the_loss_is_recon_plus_codebook_plus_weighted_commitment(ema_decay):
    model = vqvae([f"model.ema_decay={'null' if ema_decay is None else ema_decay}"]).eval()
    x = torch.rand(4, *IMAGE_SHAPE)
    terms = model.loss(x)
    z_e = model.encoder(x)
    z_q = model.quantizer.lookup(model.encode(x))  # an independent path: nearest codes
    error = (z_q - z_e).square().flatten(1).sum(1).mean()
    recon = -model.likelihood.log_prob(x, model.decoder(z_q)).mean()
    torch.testing.assert_close(terms["codebook"], error)
    torch.testing.assert_close(terms["commitment"], error)
    # The straight-through path adds and subtracts z_e: equal up to rounding.
    torch.testing.assert_close(terms["recon"], recon, rtol=1e-4, atol=1e-4)
    codebook = error if ema_decay is None else 0
    torch.testing.assert_close(terms["loss"], recon + codebook + 0.25 * error, rtol=1e-4, atol=1e-4)
    usage = code_usage(model.encode(x), model.num_codes)
    assert float(terms["codes_in_use"]) == usage["codes_in_use"]
    assert float(terms["perplexity"]) == pytest.approx(usage["perplexity"], rel=1e-5)


def test_the_grid_follows_the_image_shape():
    assert vqvae(image_shape=(1, 8, 8)).grid_shape == (4, 4)
    assert vqvae(image_shape=(1, 28, 28)).grid_shape == (7, 7)
    assert vqvae(image_shape=(3, 28, 20)).grid_shape == (7, 5)
    assert vqvae(["model.min_grid_size=2"], image_shape=(1, 8, 8)).grid_shape == (2, 2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.num_codes=0"], "model.num_codes=0 is invalid: must be an integer >= 2"),
        (
            ["model.min_grid_size=2", "model.prior.kernel_size=5"],
            "model.prior.kernel_size=5 is invalid: the code grid is 2x2, smaller than the "
            "PixelCNN's receptive field",
        ),
        (["model.prior.kernel_size=4"], "model.prior.kernel_size=4 is invalid: must be an odd"),
        (["model.ema_decay=1.5"], "model.ema_decay=1.5 is invalid"),
        (["model.dead_code_steps=0"], "model.dead_code_steps=0 is invalid"),
        (["model.min_grid_size=5"], "lower model.min_grid_size (now 5)"),
        (["model/network=mlp"], "model.network: MLP keeps no spatial grid of codes"),
        (["model/prior=frequencies", "model.prior.pseudo_count=0"], "pseudo_count=0 is invalid"),
    ],
)
def test_bad_settings_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError) as error:
        vqvae(overrides, small=not any(o.startswith("model/") for o in overrides))
    assert message in str(error.value)


def test_a_grid_too_small_for_the_pixelcnn_is_refused_at_start(tmp_path):
    run_dir = tmp_path / "run"
    result = command(
        [
            "train.py",
            "model=vqvae",
            "model.min_grid_size=2",
            "model.prior.kernel_size=7",
            f"hydra.run.dir={run_dir}",
        ]
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line == (
        "error: model.prior.kernel_size=7 is invalid: the code grid is 2x2, smaller than the "
        "PixelCNN's receptive field: its first layer reaches 3 rows above and 3 columns either "
        "side of a position; use model.prior.kernel_size=3 or less"
    )
    assert not run_dir.exists()  # nothing left that would block the corrected command


def test_every_prior_config_builds_and_fits():
    names = sorted(p.stem for p in (CONFIG_DIR / "model" / "prior").glob("*.yaml"))
    assert names == ["frequencies", "pixelcnn"]
    codes = torch.randint(0, 16, (20, 4, 4))
    for name in names:
        model = vqvae([f"model/prior={name}"], small=False)
        assert model.prior_recipe.name == name
        prior = model.prior_recipe.fit(codes, model.num_codes)
        model.set_code_prior(prior)
        assert model.sample(3).shape == (3, *IMAGE_SHAPE)


# --- both stages of a run ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory) -> Path:
    """A small VQ-VAE trained on digits for 2 epochs, its prior fitted at the end."""
    return train_run(tmp_path_factory.mktemp("vq") / "run", [*SMALL, "logger=none"])


def test_training_fits_the_prior_and_load_run_attaches_it(vq_run):
    metrics = read_metrics(vq_run)
    for split in ("val", "test"):
        for kind in ("prior", "frequencies"):
            value = metrics[f"{split}/{kind}_bits_per_code"]
            assert 0 < value < math.log2(16)  # better than a uniform guess
    for term in ("recon", "codebook", "commitment", "perplexity", "codes_in_use"):
        assert math.isfinite(metrics[f"test/{term}"])
    assert 1 <= metrics["test/codes_in_use"] <= 16
    assert (vq_run / "prior.pt").is_file()
    for name in ("pixelcnn", "frequencies"):
        assert (vq_run / "images" / f"samples_{name}.png").is_file()

    record = read_prior_record(vq_run)
    step, _ = check_checkpoint(vq_run / "checkpoints" / "best.ckpt")
    assert record["fitted_to"] == {"checkpoint": "checkpoints/best.ckpt", "global_step": step}
    model, _ = load_run(vq_run)
    assert isinstance(model.code_prior, GatedPixelCNN)
    images = model.sample(6, generator=torch.Generator().manual_seed(0))
    assert images.shape == (6, *IMAGE_SHAPE) and torch.isfinite(images).all()
    assert model.encode(torch.rand(2, *IMAGE_SHAPE)).shape == (2, 4, 4)
    # The prior's bits per code, measured again on the loaded run's test codes.
    from vae_experiments.analysis.code_prior import encode_splits
    from vae_experiments.runs import load_data

    codes = encode_splits(model, load_data(load_run(vq_run)[1]), ["test"])["test"]
    assert bits_per_code(model.code_prior, codes) == pytest.approx(
        metrics["test/prior_bits_per_code"], rel=1e-5
    )


def test_a_prior_fitted_to_other_weights_is_not_attached(vq_run, tmp_path, caplog):
    model, _ = load_run(vq_run)
    stale = tmp_path / "stale"
    stale.mkdir()
    for name in ("config.yaml", "checkpoints"):
        (stale / name).symlink_to(vq_run / name)
    save_prior(
        stale,
        model.code_prior,
        model.prior_recipe,
        {"checkpoint": "checkpoints/best.ckpt", "global_step": 3},
        {},
    )
    reloaded, _ = load_run(stale)
    assert reloaded.code_prior is None
    assert "was fitted to the codes of checkpoints/best.ckpt at step 3" in caplog.text
    assert f"python scripts/fit_prior.py run={stale} checkpoint=best" in caplog.text
    with pytest.raises(RuntimeError, match="no prior over its codes"):
        reloaded.sample(2)


def test_fit_prior_fits_saves_and_keeps_the_earlier_prior(vq_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(vq_run, run_dir)  # the other tests keep the module's run as it was
    result = command(["scripts/fit_prior.py", f"run={run_dir}", "prior=frequencies", "n=9"])
    assert result.returncode == 0, result.stderr
    assert "| frequencies (saved) |" in result.stdout
    assert (run_dir / "prior.earlier-1.pt").is_file()
    assert read_prior_record(run_dir)["recipe"]["_target_"].endswith(".Frequencies")
    (call,) = (run_dir / "analysis").glob("fit_prior-best-frequencies*")
    record = json.loads((call / "fit_prior.json").read_text())
    assert set(record["priors"]) == {"frequencies"}
    assert (call / "samples_frequencies.png").is_file()
    metrics = read_metrics(run_dir)
    assert metrics["test/prior_bits_per_code"] == metrics["test/frequencies_bits_per_code"]
    model, _ = load_run(run_dir)
    assert isinstance(model.code_prior, CodeFrequencies)


def test_fit_prior_refuses_a_run_that_is_no_vqvae(trained_runs):
    run_dir = trained_runs("ae")
    before = sorted((run_dir / "analysis").glob("*"))  # other tests' analyses of the shared run
    result = command(["scripts/fit_prior.py", f"run={run_dir}"])
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: run={run_dir}: scripts/fit_prior.py fits a prior over a VQ-VAE")
    assert sorted((run_dir / "analysis").glob("*")) == before  # no folder of its own left
    assert not (run_dir / "prior.pt").exists()


def test_priors_fitted_in_python_report_both(vq_run):
    from vae_experiments.analysis.code_prior import encode_splits
    from vae_experiments.runs import load_data

    model, cfg = load_run(vq_run, code_prior=False)
    assert model.code_prior is None
    codes = encode_splits(model, load_data(cfg))
    fitted = fit_code_priors(model, codes, Frequencies(0.5))
    assert [each.name for each in fitted] == ["frequencies"]
    assert set(prior_metrics(fitted)) == {
        f"{split}/{kind}_bits_per_code"
        for split in ("val", "test")
        for kind in ("prior", "frequencies")
    }


def test_processes_of_a_distributed_run_keep_one_codebook(tmp_path):
    """Two processes (gloo) with different batches: their counts, EMA statistics and restarts
    are shared, so each codebook, a parameter or an EMA buffer, stays the same in both."""
    import torch.multiprocessing as mp

    from tests.distributed_quantizer import quantize_in_a_process

    address = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(quantize_in_a_process, args=(2, address), nprocs=2, join=True)


def test_a_run_without_its_prior_loads_and_says_how_to_sample(vq_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(vq_run, run_dir)
    (run_dir / "prior.pt").unlink()
    model, _ = load_run(run_dir)
    assert model.code_prior is None
    with pytest.raises(RuntimeError, match=r"python scripts/fit_prior\.py run=<run dir>"):
        model.sample(2)
    result = command(["scripts/sample.py", f"run={run_dir}", "density=prior"])
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: {run_dir} has no prior over the codes of best.ckpt to sample from")
    )
    assert not (run_dir / "analysis").exists() or not list((run_dir / "analysis").iterdir())


def test_sample_without_a_density_draws_through_the_vqvaes_prior(vq_run, tmp_path, trained_runs):
    """density=auto, sample.py's default: a VQ-VAE's prior.pt (it has no code vectors to fit a
    gmm to), and the call's folder is named by it; every other model's gmm, as before."""
    from vae_experiments.cli.sample import auto_density, sample_latents

    assert auto_density(vq_run, "auto") == "prior"
    assert auto_density(trained_runs("ae"), "auto") == "gmm"
    assert auto_density(vq_run, "frequencies") == "frequencies"
    assert auto_density(tmp_path / "no run", "auto") == "gmm"  # sample_latents says what is wrong
    result = sample_latents(vq_run, n=4, out_dir=tmp_path / "call")
    assert result["sampled"]["density"] == "prior"
    assert (tmp_path / "call" / "samples_prior.png").is_file()


def test_resume_trains_on_and_fits_a_new_prior_keeping_the_earlier(vq_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(vq_run, run_dir)
    earlier = read_prior_record(run_dir)
    result = command(
        [
            "train.py",
            f"resume={run_dir}",
            "trainer.max_epochs=3",
            "trainer.enable_progress_bar=false",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(run_dir)["epochs"] == 3
    kept = torch.load(run_dir / "prior.earlier-1.pt", weights_only=True)
    assert kept["fitted_to"] == earlier["fitted_to"]
    step, _ = check_checkpoint(run_dir / "checkpoints" / "best.ckpt")
    assert read_prior_record(run_dir)["fitted_to"]["global_step"] == step
    model, _ = load_run(run_dir)
    assert model.code_prior is not None


def test_evaluate_measures_a_vqvaes_samples_and_its_priors_bits(vq_run, tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from vae_experiments.cli.evaluate import UsageError, evaluate

    def settings(*overrides: str):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose("evaluate", overrides=[f"run={run}", "device=cpu", *overrides])

    run = shutil.copytree(vq_run, tmp_path / "run")
    trained = read_metrics(run)["test/prior_bits_per_code"]
    record = evaluate(settings("quality.samples=100"))
    out = capsys.readouterr().out
    assert "Sample quality: 100 samples (prior) against 100 test images" in out
    assert "prior over codes (GatedPixelCNN, prior.pt)" in out
    metrics = read_metrics(run)
    # The same prior on the same test codes as at the end of training.
    assert metrics["test/prior_bits_per_code"] == pytest.approx(trained, rel=1e-6)
    assert record["prior_bits_per_code"] == metrics["test/prior_bits_per_code"]
    assert metrics["test/fd_classifier"] == record["sample_quality"]["fd_classifier"] > 0

    with pytest.raises(UsageError, match="codes are grids of codebook indices"):
        evaluate(settings("quality.density=gmm"))
    (run / "prior.pt").unlink()
    with pytest.raises(UsageError, match=r"no prior over the codes .* scripts/fit_prior\.py"):
        evaluate(settings())
