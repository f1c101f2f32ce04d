"""PCA in closed form, principal angles, and the theory: a linear AE converges to PCA."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA as SklearnPCA

from tests.conftest import REPO_ROOT
from vae_experiments import load_run, read_metrics
from vae_experiments.analysis.pca import fit_pca, principal_angles
from vae_experiments.models.base import squared_error
from vae_experiments.runs import load_data, load_split


@pytest.fixture(scope="module")
def digits_splits():
    from tests.conftest import compose_config

    datamodule = load_data(compose_config([]))
    return load_split(datamodule, "train")[0], load_split(datamodule, "test")[0]


def test_pca_matches_sklearn(digits_splits):
    train_x, _ = digits_splits
    ours = fit_pca(train_x)
    theirs = SklearnPCA(n_components=10, svd_solver="full").fit(train_x.flatten(1).double().numpy())
    np.testing.assert_allclose(ours.variances[:10].numpy(), theirs.explained_variance_, rtol=1e-6)
    # Directions agree up to sign.
    cosines = (ours.components[:10] * torch.from_numpy(theirs.components_)).sum(1).abs()
    np.testing.assert_allclose(cosines.numpy(), 1.0, atol=1e-6)


def test_pca_error_is_the_discarded_variance(digits_splits):
    train_x, _ = digits_splits
    pca = fit_pca(train_x)
    n = train_x.shape[0]
    for k in [1, 5, 20]:
        error = squared_error(train_x.double(), pca.reconstruct(train_x.double(), k)).mean()
        discarded = pca.variances[k:].sum() * (n - 1) / n  # Eckart-Young
        assert float(error) == pytest.approx(float(discarded), rel=1e-6)
    with pytest.raises(ValueError, match="k=65 principal components"):
        pca.encode(train_x, 65)


def test_principal_angles():
    basis = torch.eye(4)
    assert principal_angles(basis[:, :2], basis[:, :2]).max() < 1e-6
    assert principal_angles(basis[:, :2], basis[:, 2:]).min() == pytest.approx(math.pi / 2)
    theta = 0.3
    rotated = torch.stack([torch.tensor([math.cos(theta), 0, math.sin(theta), 0]), basis[:, 1]], 1)
    angles = principal_angles(basis[:, :2], rotated * torch.tensor([2.0, -3.0]))  # scale-free
    torch.testing.assert_close(
        angles, torch.tensor([0.0, theta], dtype=torch.float64), atol=1e-6, rtol=0
    )


def compare_linear_ae(out_dir, overrides: list[str]) -> dict[int, tuple[float, float]]:
    """``compare_pca.py`` with its default linear AE only: latent size -> (PCA, linear AE) test
    squared error per image."""
    from hydra import compose, initialize_config_dir

    from vae_experiments.cli.compare_pca import compare
    from vae_experiments.configs import CONFIG_DIR

    fast = [
        "trainer=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "compare_pca", overrides=[*fast, *overrides, "~methods.ae_mlp", "~methods.ae_conv"]
        )
        assert list(cfg.methods) == ["linear_ae"]
        results = compare(cfg, out_dir)
    error = {(r.method, r.latent_dim): r.test_recon_mse for r in results}
    return {k: (error["pca", k], error["linear_ae", k]) for k in cfg.latent_dims}


def test_linear_autoencoder_reaches_pca(tmp_path, digits_splits):
    """Baldi & Hornik (1989): the linear AE's optimum is PCA's error and principal subspace; with
    compare_pca's defaults (full-batch L-BFGS, small initial weights) it gets within 1%."""
    k = 8
    errors = compare_linear_ae(tmp_path, [f"latent_dims=[{k}]"])
    pca_error, ae_error = errors[k]
    assert pca_error <= ae_error * 1.001 and ae_error <= pca_error * 1.01, errors

    model, _ = load_run(tmp_path / "runs" / f"linear_ae_k{k}")
    assert ae_error == pytest.approx(
        read_metrics(tmp_path / "runs" / f"linear_ae_k{k}")["test/recon_mse"]
    )
    train_x, _ = digits_splits
    decoder_columns = model.decoder.net[0].weight.detach()  # (D, k)
    # The decoder spans PCA's leading directions; the 8th is left out of the check: its variance
    # is within 10% of the 9th's, so a mix of the two costs under 1% of the error.
    angles = principal_angles(fit_pca(train_x).components[:6].T, decoder_columns)
    assert math.degrees(float(angles.max())) < 10.0


@pytest.mark.slow
def test_linear_autoencoder_reaches_pca_at_every_default_size_on_digits(tmp_path):
    errors = compare_linear_ae(tmp_path, [])
    assert sorted(errors) == [2, 8, 16, 32]  # compare_pca.yaml's latent_dims
    for pca_error, ae_error in errors.values():
        assert ae_error <= pca_error * 1.01, errors


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(
    not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
    reason=f"needs Fashion-MNIST in {FASHION_MNIST} (apt-get install dataset-fashion-mnist)",
)
def test_linear_autoencoder_reaches_pca_on_fashion_mnist(tmp_path):
    """Real 784-pixel images: 12,000 training images (val_size=0.8 of the 60,000), the 10,000
    test images, compare_pca's default linear AE against PCA fitted on the same 12,000."""
    errors = compare_linear_ae(
        tmp_path, ["data=fashion_mnist", "data.source.val_size=0.8", "latent_dims=[8]"]
    )
    pca_error, ae_error = errors[8]
    assert ae_error <= pca_error * 1.01, errors


@pytest.mark.slow  # the whole command in a subprocess; compare() is tested in process
def test_compare_pca_command_writes_its_report(tmp_path):
    out = tmp_path / "report"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "compare_pca.py"),
            "latent_dims=[2,3]",
            "trainer=cpu",
            "trainer.max_epochs=1",
            "data.batch_size=64",
            "methods.ae_conv=['model=ae','model/network=conv','model.network.channels=[4,8]']",
            f"hydra.run.dir={out}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with (out / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["method", "latent_dim", "test_recon_mse"]
    assert {(r["method"], int(r["latent_dim"])) for r in rows} == {
        (m, k) for m in ["pca", "linear_ae", "ae_mlp", "ae_conv"] for k in [2, 3]
    }
    assert all(float(r["test_recon_mse"]) > 0 for r in rows)
    # The PCA figure is the closed form; each method's figure is its run's test metric.
    pca_3 = next(
        float(r["test_recon_mse"]) for r in rows if r["method"] == "pca" and r["latent_dim"] == "3"
    )
    assert pca_3 < next(
        float(r["test_recon_mse"]) for r in rows if r["method"] == "pca" and r["latent_dim"] == "2"
    )
    for r in rows:
        if r["method"] != "pca":
            metrics = read_metrics(out / "runs" / f"{r['method']}_k{r['latent_dim']}")
            assert float(r["test_recon_mse"]) == pytest.approx(metrics["test/recon_mse"], rel=1e-5)
    assert "| pca |" in (out / "comparison.md").read_text()
    for picture in ["error_vs_latent_dim.png", "reconstructions.png"]:
        assert (out / picture).read_bytes().startswith(b"\x89PNG")
    assert list((out / "tensorboard").glob("events.*"))
    assert not (tmp_path / "outputs").exists()
    # A line per job with its place in the whole; the runs' own lines go to the log file only,
    # and no progress bar is drawn into a pipe.
    shown = (result.stdout + result.stderr).splitlines()
    for number, (method, k) in enumerate(
        [(m, k) for m in ["linear_ae", "ae_mlp", "ae_conv"] for k in [2, 3]], 1
    ):
        assert any(f"job {number} of 6: training {method} with latent size {k}" in s for s in shown)
        assert any(f"job {number} of 6: {method} k={k}: test squared error" in s for s in shown)
    assert len(shown) < 40, "\n".join(shown)
    assert not [line for line in shown if "epoch 1/1" in line or "it/s" in line]
    assert "epoch 1/1 (step" in (out / "compare_pca.log").read_text()


def test_compare_pca_never_writes_into_an_earlier_comparison(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vae_experiments.cli import compare_pca  # registers ${run_dir:...}
    from vae_experiments.configs import CONFIG_DIR
    from vae_experiments.runs.lock import release_all

    # The default directory: a new one per call, also for two calls in the same second.
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        chosen = [
            OmegaConf.select(compose("compare_pca", return_hydra_config=True), "hydra.run.dir")
            for _ in range(2)
        ]
    assert chosen[0] != chosen[1] and all((tmp_path / d).is_dir() for d in chosen)

    # hydra.run.dir= naming an earlier comparison: refused before Hydra writes anything.
    earlier = tmp_path / "report"
    (earlier / ".hydra").mkdir(parents=True)
    (earlier / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (earlier / "comparison.csv").write_text("method,latent_dim,test_recon_mse\n")
    monkeypatch.setattr(sys, "argv", ["compare_pca.py", f"hydra.run.dir={earlier}"])
    with pytest.raises(SystemExit, match="already holds a run .* or delete it first") as refused:
        compare_pca.main()
    assert "resume=" not in str(refused.value)
    release_all()  # the lock the command took, which its exit releases
    assert (earlier / ".hydra" / "config.yaml").read_text() == "seed: 0\n"
    assert sorted(p.name for p in earlier.iterdir()) == [".hydra", "comparison.csv"]
