"""Latent densities, traversals and scatters; the end-of-training callback; scripts/sample.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture as SklearnGaussianMixture
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from tests.conftest import FAST, REPO_ROOT, compose_config
from vae_experiments import load_run
from vae_experiments.analysis.latent import (
    DiagonalGaussian,
    GaussianMixture,
    StandardNormal,
    encode_split,
    fit_density,
    heldout_log_likelihood,
    latent_traversal,
    traversal_codes,
)
from vae_experiments.analysis.latent_plots import latent_scatter, project_2d
from vae_experiments.cli.common import analysis_dir, run_dir_of
from vae_experiments.data.datamodule import ImageDataModule
from vae_experiments.models import (
    MLP,
    VAE,
    Autoencoder,
    Bernoulli,
    Conv,
    LatentModel,
    Network,
)
from vae_experiments.models.likelihoods import SquaredError
from vae_experiments.runs import load_data, load_split
from vae_experiments.runs.records import find_run_dirs
from vae_experiments.training.latent_callback import LatentSamples
from vae_experiments.training.module import LitModel

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def correlated_codes(n: int, seed: int) -> torch.Tensor:
    """Codes (n, 3) with correlated dimensions, unequal scales and an offset."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.tensor([[2.0, 0.0, 0.0], [1.5, 0.5, 0.0], [-0.3, 0.2, 0.1]])
    return torch.randn(n, 3, generator=generator) @ mixing.T + torch.tensor([1.0, -2.0, 5.0])


def three_clusters(n: int, seed: int) -> tuple[torch.Tensor, torch.distributions.Distribution]:
    """n codes (n, 2) from a mixture of three well separated, elongated Gaussians, and that
    mixture."""
    means = torch.tensor([[-6.0, 0.0], [0.0, 6.0], [6.0, 0.0]], dtype=torch.float64)
    covariances = torch.tensor(
        [[[1.0, 0.8], [0.8, 1.0]], [[0.3, 0.0], [0.0, 0.3]], [[1.0, -0.7], [-0.7, 1.0]]],
        dtype=torch.float64,
    )
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)),
        torch.distributions.MultivariateNormal(means, covariances),
    )
    torch.manual_seed(seed)
    return mixture.sample((n,)).float(), mixture


# --- densities ---------------------------------------------------------------------------------


def test_diagonal_gaussian_is_the_factored_maximum_likelihood_gaussian():
    codes, z = correlated_codes(2000, 0), correlated_codes(100, 1)
    density = DiagonalGaussian().fit(codes)
    reference = torch.distributions.Normal(codes.mean(0), codes.std(0, correction=0))
    torch.testing.assert_close(density.log_prob(z), reference.log_prob(z).sum(-1))
    assert heldout_log_likelihood(density, z) == pytest.approx(
        reference.log_prob(z).sum(-1).mean().item(), rel=1e-5
    )

    samples = density.sample(50_000, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (50_000, 3)
    torch.testing.assert_close(samples.mean(0), codes.mean(0), atol=0.03, rtol=0)
    torch.testing.assert_close(samples.var(0), codes.var(0), rtol=0.03, atol=1e-3)
    # Factored: the strong correlation of dimensions 0 and 1 in the codes is gone in the draws.
    assert np.corrcoef(codes[:, :2].T.numpy())[0, 1] > 0.9
    assert abs(np.corrcoef(samples[:, :2].T.numpy())[0, 1]) < 0.02


def test_standard_normal_is_the_prior():
    z = correlated_codes(50, 0)
    density = StandardNormal(3).fit(z)
    reference = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(density.log_prob(z), reference)
    samples = density.sample(20_000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(samples.mean(0), torch.zeros(3), atol=0.03, rtol=0)
    torch.testing.assert_close(samples.std(0), torch.ones(3), atol=0.03, rtol=0)


def test_gaussian_mixture_log_prob_matches_scikit_learn():
    codes, _ = three_clusters(1500, 0)
    z, _ = three_clusters(200, 1)
    density = GaussianMixture(components=3, seed=0).fit(codes)
    # The same EM, run by scikit-learn directly, scored by scikit-learn's own formula.
    reference = SklearnGaussianMixture(
        n_components=3, covariance_type="full", random_state=0, reg_covar=density.reg_covar_
    ).fit(codes.double().numpy())
    expected = torch.from_numpy(reference.score_samples(z.double().numpy()))
    torch.testing.assert_close(density.log_prob(z).double(), expected, rtol=1e-5, atol=1e-5)
    assert density.log_prob(z).dtype == torch.float32
    assert density.converged_


def test_gaussian_mixture_samples_have_the_mixture_moments():
    codes, _ = three_clusters(1500, 0)
    density = GaussianMixture(components=3, seed=0).fit(codes)
    weights, means, tril = density.log_weights.exp(), density.means, density.scale_tril
    covariances = tril @ tril.transpose(1, 2)
    mean = weights @ means
    second = (weights[:, None, None] * (covariances + means[:, :, None] * means[:, None, :])).sum(0)
    covariance = second - mean[:, None] * mean[None, :]

    samples = density.sample(60_000, generator=torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(samples.mean(0), mean, atol=0.05, rtol=0)
    torch.testing.assert_close(samples.T.cov(), covariance, atol=0.15, rtol=0.01)
    # Each component gets its share of the draws (the clusters are far apart).
    nearest = torch.cdist(samples, means).argmin(1)
    shares = torch.bincount(nearest, minlength=3).double() / len(samples)
    torch.testing.assert_close(shares, weights, atol=0.01, rtol=0)
    # Seeded draws repeat.
    first, again = (density.sample(100, generator=torch.Generator().manual_seed(1)) for _ in "ab")
    torch.testing.assert_close(first, again)


def test_gmm_beats_the_factored_gaussian_on_clustered_codes():
    codes, mixture = three_clusters(2000, 0)
    heldout, _ = three_clusters(1000, 1)
    true = mixture.log_prob(heldout.double()).mean().item()
    gmm = heldout_log_likelihood(fit_density("gmm", codes, components=3), heldout)
    diag = heldout_log_likelihood(fit_density("diag_gaussian", codes), heldout)
    # The mixture recovers the true density; the factored Gaussian is far below it.
    assert gmm == pytest.approx(true, abs=0.05)
    assert diag < true - 1.0


def test_fit_density_rejects_bad_requests():
    codes = correlated_codes(5, 0)
    with pytest.raises(ValueError, match="diag_gaussian, gmm"):
        fit_density("flow", codes)
    with pytest.raises(ValueError, match="components=10 needs at least 10 codes, got 5"):
        fit_density("gmm", codes, components=10)
    with pytest.raises(ValueError, match=r"shape \(N, latent_dim\)"):
        fit_density("diag_gaussian", codes[0])


# --- encoding and traversals -------------------------------------------------------------------


class Reshape(Network):
    """Identity maps: images (B, 1, 1, D) <-> codes (B, D)."""

    def encoder(self, image_shape, out_features):
        return nn.Flatten()

    def decoder(self, image_shape, latent_dim):
        linear = nn.Linear(latent_dim, latent_dim)
        nn.init.eye_(linear.weight)
        nn.init.zeros_(linear.bias)
        return nn.Sequential(linear, nn.Unflatten(1, tuple(image_shape)))


class ReshapeModel(LatentModel):
    """decode(z) = z as a (1, 1, D) image, so a traversal's images show its codes."""

    def __init__(self, dim: int):
        super().__init__((1, 1, dim), dim, Reshape(), SquaredError(), dim)


def test_traversal_varies_one_dimension_per_row_across_its_quantiles():
    codes = correlated_codes(1000, 0)
    steps = 5
    images = latent_traversal(ReshapeModel(3), codes, steps=steps)
    assert images.shape == (3 * steps, 1, 1, 3)
    z = images.reshape(3, steps, 3)  # (row, step, dim)
    median = torch.from_numpy(np.median(codes.numpy(), axis=0))
    low, high = (
        torch.from_numpy(np.quantile(codes.numpy(), q, axis=0)).float() for q in (0.05, 0.95)
    )
    for row in range(3):
        others = [d for d in range(3) if d != row]
        torch.testing.assert_close(z[row][:, others], median[others].expand(steps, 2))
        expected = torch.linspace(low[row].item(), high[row].item(), steps)
        torch.testing.assert_close(z[row][:, row], expected, rtol=1e-5, atol=1e-5)

    subset = traversal_codes(codes, steps=steps, dims=[2]).reshape(1, steps, 3)
    torch.testing.assert_close(subset[0], z[2])
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        traversal_codes(codes, dims=[3])


def test_encode_split_matches_encode_and_restores_the_mode(images):
    model = Autoencoder([1, 8, 8], 3, Conv([4, 8]), SquaredError())  # BatchNorm
    labels = torch.arange(len(images))
    batches = [(images[:10], labels[:10]), (images[10:], labels[10:])]
    codes, got_labels = encode_split(model, batches, return_labels=True)
    assert model.training  # restored
    with torch.no_grad():
        expected = model.eval().encode(images)
    torch.testing.assert_close(codes, expected)
    torch.testing.assert_close(got_labels, labels)
    torch.testing.assert_close(encode_split(model, [images[:7], images[7:]]), expected)


# --- scatter -----------------------------------------------------------------------------------


def test_projection_is_identity_in_2d_and_pca_otherwise():
    codes = correlated_codes(300, 0)
    points, axes, description = project_2d(codes)
    reference = PCA(n_components=2).fit(codes.double().numpy())
    expected = reference.transform(codes.double().numpy())
    # Principal components are defined up to sign.
    np.testing.assert_allclose(np.abs(points.numpy()), np.abs(expected), rtol=1e-6, atol=1e-8)
    share = reference.explained_variance_ratio_[0]
    assert axes[0] == f"PC1 ({share:.0%} of variance)" and "PCA" in description

    flat = codes[:, :2]
    points, axes, description = project_2d(flat)
    torch.testing.assert_close(points.float(), flat)
    assert axes == ("z1", "z2") and "PCA" not in description


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_latent_scatter_writes_a_png(tmp_path, dim):
    generator = torch.Generator().manual_seed(0)
    codes = torch.randn(2000, dim, generator=generator)
    labels = torch.randint(0, 10, (2000,), generator=generator)
    path = latent_scatter(codes, labels, tmp_path / "sub" / "scatter.png", title="test")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000
    # Many distinct labels (a colourbar) and no labels work too.
    latent_scatter(codes, torch.arange(2000), tmp_path / "many.png")
    latent_scatter(codes, None, tmp_path / "none.png")
    assert (tmp_path / "many.png").is_file() and (tmp_path / "none.png").is_file()
    with pytest.raises(ValueError, match="got 3 labels for 2000 codes"):
        latent_scatter(codes, labels[:3], tmp_path / "bad.png")


# --- the end-of-training callback --------------------------------------------------------------


def fit_with_callback(tmp_path: Path, model: LatentModel) -> tuple[LatentSamples, object]:
    pl.seed_everything(0)
    data = instantiate(compose_config([*FAST, "model=ae"]).data)
    callback = LatentSamples(num_samples=16, components=3, output_dir=tmp_path / "images")
    module = LitModel(model, partial(torch.optim.Adam, lr=1e-3))
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=pl.loggers.TensorBoardLogger(str(tmp_path), name="tensorboard", version=""),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=10,
    )
    trainer.fit(module, datamodule=ImageDataModule(data))
    return callback, data


def test_callback_logs_latent_samples_and_likelihoods_for_an_ae(tmp_path):
    model = Autoencoder([1, 8, 8], 3, MLP([32]), SquaredError())
    callback, datamodule = fit_with_callback(tmp_path, model)

    for kind in ("diag_gaussian", "gmm"):
        assert (tmp_path / "images" / f"samples_{kind}.png").read_bytes()[:8] == PNG_MAGIC
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert {"images/samples_diag_gaussian", "images/samples_gmm"} <= set(events.Tags()["images"])
    grid = events.Images("images/samples_gmm")[-1]
    # 16 as 4x4 of 48px + padding, and a margin on the left saying what they are.
    assert grid.height == 4 * 50 + 2 and grid.width - (4 * 50 + 2) > 20

    # The logged values: the validation codes under densities fitted to the training codes.
    model.eval()
    with torch.no_grad():
        train = model.encode(datamodule.to_float(datamodule.splits["train"].images))
        val = model.encode(datamodule.to_float(datamodule.splits["val"].images))
    diag = torch.distributions.Normal(train.mean(0), train.std(0, correction=0))
    expected_diag = diag.log_prob(val).sum(-1).mean().item()
    reference = SklearnGaussianMixture(
        n_components=3,
        covariance_type="full",
        random_state=0,
        reg_covar=1e-6 * train.double().var(0, correction=0).mean().item(),
    ).fit(train.double().numpy())
    expected_gmm = reference.score_samples(val.double().numpy()).mean()
    assert callback.results["latent/log_lik_diag_gaussian"] == pytest.approx(
        expected_diag, rel=1e-4
    )
    assert callback.results["latent/log_lik_gmm"] == pytest.approx(expected_gmm, rel=1e-4)
    for name, value in callback.results.items():
        assert events.Scalars(name)[-1].value == pytest.approx(value, rel=1e-5)


def test_callback_leaves_models_with_a_prior_alone(tmp_path):
    model = VAE([1, 8, 8], 2, MLP([16]), Bernoulli(), beta=1.0, kl_warmup_steps=0)
    callback, _ = fit_with_callback(tmp_path, model)
    assert callback.results == {} and not (tmp_path / "images").exists()


# --- scripts/sample.py -------------------------------------------------------------------------


def run_sample(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "sample.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def outputs_of(result: subprocess.CompletedProcess) -> Path:
    """The folder a command's call wrote into, from its last line ("... outputs are in DIR")."""
    return Path(result.stdout.strip().splitlines()[-1].rsplit(" are in ", 1)[1])


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and modification time (ns)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_sample_command_on_an_ae(trained_runs, tmp_path):
    run = trained_runs("ae")
    config = (run / "config.yaml").read_bytes()
    folders = set((run / "analysis").glob("*"))
    result = run_sample(tmp_path, f"run={run}", "n=20", "components=3", "seed=1")
    assert result.returncode == 0, result.stderr[-3000:]
    # A second call whose folder name would be the same (only the seed differs; what main()
    # runs, in process): every file of the first call stays as it was.
    from vae_experiments.cli.sample import sample_latents

    first, folders_first = snapshot(run / "analysis"), set((run / "analysis").glob("*"))
    report = sample_latents(run, n=20, components=3, seed=2, device="cpu")
    after = snapshot(run / "analysis")
    assert {name: after.get(name) for name in first} == first

    out = outputs_of(result)  # this call's own folder, named after what made it
    assert folders_first - folders == {out}  # claimed once
    assert out.name.startswith("sample-best-gmm-c3")
    for name in ("samples_gmm.png", "traversal.png", "latent_scatter.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert (out / "sample.log").is_file()
    assert "components=3" in (out / "sample.yaml").read_text()  # what made it
    assert (run / "config.yaml").read_bytes() == config
    assert not (run / ".hydra").exists()  # Hydra wrote nothing into the run
    assert list(tmp_path.iterdir()) == []  # no outputs/ (or anything else) in the cwd
    assert "gmm" in result.stdout and "diag_gaussian" in result.stdout

    second = Path(report["sampled"]["png"]).parent  # a folder of its own
    assert set((run / "analysis").glob("*")) - folders_first == {second}
    assert second.name.startswith("sample-best-gmm-c3_") and report["seed"] == 2
    assert find_run_dirs(run.parent) == [run]  # summarize.py takes no call folder for a run

    report = json.loads((out / "latent_densities.json").read_text())
    assert report["num_train_codes"] == 1294 and report["num_test_codes"] == 359
    assert set(report["test_log_lik"]) == {"diag_gaussian", "gmm"}
    # The numbers are the test codes' log-likelihoods, recomputed here from the best checkpoint.
    model, cfg = load_run(run)
    datamodule = load_data(cfg)
    with torch.no_grad():
        train = model.encode(load_split(datamodule, "train")[0])
        test = model.encode(load_split(datamodule, "test")[0])
    diag = torch.distributions.Normal(train.mean(0), train.std(0, correction=0))
    expected_diag = diag.log_prob(test).sum(-1).mean().item()
    expected_gmm = heldout_log_likelihood(GaussianMixture(3, seed=1).fit(train), test)
    assert report["test_log_lik"]["diag_gaussian"] == pytest.approx(expected_diag, rel=1e-4)
    assert report["test_log_lik"]["gmm"] == pytest.approx(expected_gmm, rel=1e-4)
    assert report["test_log_lik"]["gmm"] > report["test_log_lik"]["diag_gaussian"]

    # n=20 draws as rows of ceil(sqrt(20)) = 5: a 5x4 grid of 48px digits with 2px padding.
    from matplotlib.image import imread

    height, width = imread(out / "samples_gmm.png").shape[:2]
    assert height == 4 * 50 + 2 and width - (5 * 50 + 2) > 20  # a label's margin on the left
    # traversal: one row of 9 per latent dimension (4), their labels in a margin on the left.
    height, width = imread(out / "traversal.png").shape[:2]
    assert height == 4 * 50 + 2 and 9 * 50 + 2 + 20 < width < 9 * 50 + 2 + 200


def test_sample_command_on_a_vae_offers_its_prior(trained_runs):
    from vae_experiments.cli.sample import sample_latents  # what main() calls, in process

    run = trained_runs("vae_2d")
    ckpt = run / "checkpoints" / "last.ckpt"
    report = sample_latents(ckpt, density="prior", n=16, components=2, device="cpu")
    out = Path(report["sampled"]["png"]).parent  # a new folder, named after the .ckpt's name
    assert out.parent == run / "analysis" and out.name.startswith("sample-last-prior-c2")
    assert (out / "samples_prior.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "latent_scatter.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((out / "latent_densities.json").read_text()) == report
    assert report["checkpoint"] == str(ckpt) and report["model"] == "VAE"
    assert set(report["test_log_lik"]) == {"diag_gaussian", "gmm", "prior"}
    # The prior's value is the test posterior means under N(0, I), computed here directly.
    model, cfg = load_run(ckpt)
    with torch.no_grad():
        mu, _ = model.posterior(load_split(load_data(cfg), "test")[0])
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(mu).sum(-1).mean().item()
    assert report["test_log_lik"]["prior"] == pytest.approx(expected, rel=1e-5)


def test_each_analysis_call_claims_a_folder_of_its_own(tmp_path):
    from vae_experiments.cli.common import discard_unused

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    analysis = run / "analysis"

    first = analysis_dir(run, "sample", "best", "gmm", "c10")
    assert first == str(analysis / "sample-best-gmm-c10") and Path(first).is_dir()
    (Path(first) / "latent_densities.json").write_text("{}")
    # Taken names are never reused, even if empty: _1, _2, ...
    assert analysis_dir(run, "sample", "best", "gmm", "c10") == f"{first}_1"
    assert analysis_dir(str(run), "sample", "best", "gmm", "c10") == f"{first}_2"
    assert (Path(first) / "latent_densities.json").read_text() == "{}"
    # A .ckpt file names the checkpoint; a setting cannot leave the analysis folder.
    ckpt = run / "checkpoints" / "epoch=3-step=40.ckpt"
    ckpt.write_bytes(b"")
    assert analysis_dir(ckpt, "evaluate", "best", "test", "k5") == str(
        analysis / "evaluate-epoch=3-step=40-test-k5"
    )
    assert analysis_dir(run, "sample", "last", "../x") == str(analysis / "sample-last-.._x")
    assert analysis_dir(run, "sample-multirun") == str(analysis / "sample-multirun")

    # A call that stopped at a bad setting leaves nothing; one that wrote results is kept.
    failed = Path(analysis_dir(run, "sample", "best", "typo"))
    (failed / "sample.log").write_text("")
    (failed / "sample.yaml").write_text("")
    assert discard_unused(failed, "sample") and not failed.exists()
    assert not discard_unused(first, "sample") and Path(first).is_dir()


def test_sample_command_rejects_bad_runs_and_densities(trained_runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as refused:
        analysis_dir(tmp_path / "typo", "sample")
    assert refused.value.code == 2
    assert re.match(r"error: .* is not a run directory", capsys.readouterr().err)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        run_dir_of(tmp_path / "typo")
    assert not (tmp_path / "typo").exists()
    run = trained_runs("ae")
    assert run_dir_of(run / "checkpoints" / "best.ckpt") == run

    from vae_experiments.cli.sample import sample_latents

    with pytest.raises(ValueError, match="only for models trained with one"):
        sample_latents(run, density="prior")
