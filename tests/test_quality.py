"""Sample quality: the Fréchet distance, precision/recall, the dataset classifier and its cache,
and scripts/evaluate.py's numbers for models that sample."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch

from vae_experiments.analysis import classifier as classifier_module
from vae_experiments.analysis.classifier import (
    CorruptClassifierError,
    FeatureClassifier,
    classifier_file,
    load_or_train_classifier,
)
from vae_experiments.analysis.latent import DecodedDensity, fit_density
from vae_experiments.analysis.quality import (
    INCEPTION_WEIGHTS_NAME,
    check_inception,
    frechet_distance,
    frechet_distance_of_gaussians,
    gaussian_statistics,
    kth_neighbour_radii,
    measure_samples,
    precision_recall,
)
from vae_experiments.runs import read_metrics


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_covariance(dim: int, generator: torch.Generator) -> torch.Tensor:
    a = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(dim, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# The Fréchet distance


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    """For diagonal covariances, tr(C1 + C2 - 2 (C1 C2)^(1/2)) = sum (s1 - s2)^2."""
    f64 = torch.float64
    m1, m2 = torch.tensor([0.0, 1.0, -2.0], dtype=f64), torch.tensor([1.0, 1.0, 0.5], dtype=f64)
    s1, s2 = torch.tensor([1.0, 2.0, 0.5], dtype=f64), torch.tensor([3.0, 0.1, 0.5], dtype=f64)
    expected = float((m1 - m2).square().sum() + (s1 - s2).square().sum())
    got = frechet_distance_of_gaussians(m1, torch.diag(s1**2), m2, torch.diag(s2**2))
    assert got == pytest.approx(expected, rel=1e-10)
    assert frechet_distance_of_gaussians(m1, torch.diag(s1**2), m1, torch.diag(s1**2)) == (
        pytest.approx(0.0, abs=1e-10)
    )


def test_frechet_distance_matches_scipy_sqrtm_on_full_covariances():
    generator = seeded(1)
    m1 = torch.randn(5, generator=generator, dtype=torch.float64)
    m2 = torch.randn(5, generator=generator, dtype=torch.float64)
    c1, c2 = random_covariance(5, generator), random_covariance(5, generator)
    root = scipy.linalg.sqrtm(c1.numpy() @ c2.numpy()).real
    expected = float(
        np.sum((m1.numpy() - m2.numpy()) ** 2) + np.trace(c1.numpy() + c2.numpy() - 2 * root)
    )
    assert frechet_distance_of_gaussians(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_feature_sets_uses_their_mean_and_unbiased_covariance():
    generator = seeded(2)
    real = torch.randn(200, 3, generator=generator, dtype=torch.float64)
    fake = 2 * torch.randn(150, 3, generator=generator, dtype=torch.float64) + 1
    mean, cov = gaussian_statistics(real)
    assert torch.allclose(cov, torch.from_numpy(np.cov(real.numpy(), rowvar=False)))
    expected = frechet_distance_of_gaussians(mean, cov, *gaussian_statistics(fake))
    assert frechet_distance(real, fake) == pytest.approx(expected)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-9)


# --------------------------------------------------------------------------------------------
# Precision and recall


def clusters(centres: torch.Tensor, per_cluster: int, generator: torch.Generator) -> torch.Tensor:
    """per_cluster points of spread 0.1 around each centre (K, F): (K * per_cluster, F)."""
    noise = 0.1 * torch.randn(len(centres), per_cluster, centres.shape[1], generator=generator)
    return (centres[:, None] + noise).reshape(-1, centres.shape[1])


def test_identical_sets_have_precision_and_recall_one():
    points = torch.randn(100, 4, generator=seeded(0))
    assert precision_recall(points, points.clone(), k=3) == (1.0, 1.0)


def test_disjoint_far_sets_have_precision_and_recall_zero():
    real = torch.randn(100, 4, generator=seeded(0))
    assert precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)


def test_a_generator_covering_half_the_modes_has_recall_one_half():
    centres = 10.0 * torch.eye(4)  # four far-apart modes
    real = clusters(centres, 100, seeded(0))
    fake = clusters(centres[:2], 200, seeded(1))  # as many samples, from two of the modes
    precision, recall = precision_recall(real, fake, k=3)
    # The samples come from real modes: about 0.9, as k=3 balls around 100 points miss the tails.
    assert precision > 0.85
    assert recall == pytest.approx(0.5, abs=0.05)


def test_kth_neighbour_radii_leave_the_point_itself_out():
    points = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    assert kth_neighbour_radii(points, 1).tolist() == [1.0, 1.0, 2.0, 3.0]
    assert kth_neighbour_radii(points, 3).tolist() == [6.0, 5.0, 3.0, 6.0]
    with pytest.raises(ValueError, match="k must be from 1 to N - 1 = 3, got k=4"):
        kth_neighbour_radii(points, 4)


# --------------------------------------------------------------------------------------------
# The classifier and its cache


@pytest.fixture
def quick_recipe(monkeypatch):
    """A recipe of a few steps (part of the cache key, so its files are its own)."""
    monkeypatch.setitem(classifier_module.RECIPE, "min_steps", 5)
    monkeypatch.setitem(classifier_module.RECIPE, "epochs", 1)
    monkeypatch.setitem(classifier_module.RECIPE, "batch_size", 16)


def labelled_images(n: int = 48, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n uint8 images (1, 8, 8): class 0 dark, class 1 bright."""
    labels = torch.arange(n) % 2
    noise = torch.randint(0, 60, (n, 1, 8, 8), generator=seeded(seed))
    return (noise + 190 * labels[:, None, None, None]).to(torch.uint8), labels


def test_classifier_is_trained_once_and_then_loaded(quick_recipe, tmp_path, monkeypatch):
    train_x, train_y = labelled_images()
    test_x, test_y = labelled_images(20, seed=1)
    first = load_or_train_classifier(train_x, train_y, test_x, test_y, tmp_path, "toy")
    assert first.trained and first.path.is_file()
    assert first.path.name.startswith("classifier-toy-1x8x8-")
    assert first.path == classifier_file(tmp_path, "toy", train_x, train_y)
    assert 0.0 <= first.test_accuracy <= 1.0
    saved = torch.load(first.path, weights_only=True)
    assert saved["info"]["test_accuracy"] == first.test_accuracy
    assert saved["info"]["num_classes"] == 2

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier was trained again")

    monkeypatch.setattr(classifier_module, "train_classifier", no_training)
    second = load_or_train_classifier(train_x, train_y, test_x, test_y, tmp_path, "toy")
    assert not second.trained and second.test_accuracy == first.test_accuracy
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(second.model.features(x), first.model.features(x))
    # Other training images are another classifier.
    other = classifier_file(tmp_path, "toy", train_x.flip(0), train_y.flip(0))
    assert other != first.path


def test_classifier_training_is_deterministic(quick_recipe):
    x, y = labelled_images()
    before = torch.random.get_rng_state()
    a = classifier_module.train_classifier(x, y)
    b = classifier_module.train_classifier(x, y)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is left alone
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_a_corrupt_classifier_file_is_refused_by_name(quick_recipe, tmp_path):
    x, y = labelled_images()
    path = classifier_file(tmp_path, "toy", x, y)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CorruptClassifierError) as error:
        load_or_train_classifier(x, y, x, y, tmp_path, "toy")
    assert str(path) in str(error.value) and "delete it" in str(error.value)
    assert path.read_bytes() == b"not a checkpoint"  # left for the user to look at


def test_unlabelled_data_gets_no_classifier(quick_recipe, tmp_path):
    x, _ = labelled_images()
    with pytest.raises(ValueError, match="single label .* needs labelled data"):
        load_or_train_classifier(
            x, torch.zeros(len(x), dtype=torch.long), x, x[:, 0, 0, 0].long(), tmp_path, "toy"
        )
    assert list(tmp_path.iterdir()) == []


def test_classifier_features_for_each_image_size():
    for shape in [(1, 8, 8), (1, 28, 28), (3, 64, 64)]:
        model = FeatureClassifier(shape, num_classes=10)
        assert model.features(torch.rand(2, *shape)).shape == (2, 128)
        assert model(torch.rand(2, *shape)).shape == (2, 10)


# --------------------------------------------------------------------------------------------
# Samplers and the measurement


class Replay:
    """A sampler that returns given images in order: a perfect (memorising) generator."""

    def __init__(self, images: torch.Tensor):
        self.images, self.position = images, 0

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        out = self.images[self.position : self.position + n]
        self.position += n
        return out


class Features(torch.nn.Module):
    """Flattened pixels as features."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def test_measure_samples_of_the_real_images_and_of_noise():
    real = torch.rand(60, 1, 4, 4, generator=seeded(0))
    same = measure_samples(Replay(real), Features(), real, n=60, k=3, batch_size=16)
    assert same["fd_classifier"] == pytest.approx(0.0, abs=1e-9)
    assert (same["precision"], same["recall"]) == (1.0, 1.0)
    assert same["num_samples"] == same["num_real"] == 60
    assert same["reference_fd_classifier"] is None and same["fid_inception"] is None
    # Out-of-range samples are clamped to [0, 1]: far-off values become the image corners.
    far = measure_samples(Replay(real + 5.0), Features(), real, 60, reference=real.flip(0))
    assert far["precision"] == 0.0 and far["fd_classifier"] > same["fd_classifier"]
    assert far["reference_fd_classifier"] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="NaN or inf"):
        measure_samples(Replay(real * float("nan")), Features(), real, 60)


def test_decoded_density_samples_an_autoencoder(trained_runs):
    from vae_experiments.runs import iterate_split, load_data, load_run

    model, cfg = load_run(trained_runs("ae"))
    from vae_experiments.analysis.latent import encode_split

    codes = encode_split(model, iterate_split(load_data(cfg), "train"))
    sampler = DecodedDensity(model, fit_density("gmm", codes, components=3))
    a, b = sampler.sample(5, generator=seeded(3)), sampler.sample(5, generator=seeded(3))
    assert a.shape == (5, 1, 8, 8) and torch.equal(a, b)


def test_the_inception_fid_says_what_is_missing(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "torch_fidelity" else real_find_spec(name, *a),
    )
    with pytest.raises(ValueError, match="needs torch-fidelity.*pip install torch-fidelity"):
        check_inception(tmp_path / INCEPTION_WEIGHTS_NAME)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    with pytest.raises(
        ValueError, match=f"no such file; put torch-fidelity's {INCEPTION_WEIGHTS_NAME}"
    ):
        check_inception(tmp_path / "missing.pth")
    # torch-fidelity unpickles the file fully: only plain tensors get that far.
    pickled = tmp_path / "pickled.pth"
    torch.save({"conv.weight": torch.zeros(1), "extra": {"a": 1}}, pickled)
    with pytest.raises(ValueError, match="no plain state dict of tensors"):
        check_inception(pickled)
    plain = tmp_path / INCEPTION_WEIGHTS_NAME
    torch.save({"conv.weight": torch.zeros(1)}, plain)
    assert check_inception(plain) == plain


# --------------------------------------------------------------------------------------------
# scripts/evaluate.py on an autoencoder (the VAE's numbers: tests/test_likelihood.py)


def compose_evaluate(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from vae_experiments.configs import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("evaluate", overrides=overrides)


def test_evaluate_measures_an_autoencoders_samples(trained_runs, tmp_path, capsys):
    from vae_experiments.cli.evaluate import UsageError, evaluate

    run = shutil.copytree(trained_runs("ae"), tmp_path / "run")
    before = read_metrics(run)
    record = evaluate(compose_evaluate([f"run={run}", "quality.samples=100", "device=cpu"]))
    out = capsys.readouterr().out
    assert "Sample quality: 100 samples (gmm (10 components)) against 100 test images" in out
    assert "not the Inception FID" in out and "log p(x)" not in out
    metrics = read_metrics(run)
    quality = record["sample_quality"]
    assert metrics["test/fd_classifier"] == quality["fd_classifier"] > 0
    assert metrics["test/sample_precision"] == quality["precision"]
    assert metrics["test/sample_recall"] == quality["recall"]
    assert metrics["test/quality_samples"] == 100
    assert "test/log_px" not in metrics and "test/fid_inception" not in metrics
    assert {k: metrics[k] for k in before} == before
    assert quality["classifier"]["dataset"] == "digits"
    assert 0.9 < quality["classifier"]["test_accuracy"] <= 1.0
    saved = json.loads(
        (run / "analysis" / "evaluate-best-test-k5000" / "evaluate_test.json").read_text()
    )
    assert saved["sample_quality"]["fd_classifier"] == quality["fd_classifier"]

    with pytest.raises(UsageError, match="Autoencoder has no prior to sample from"):
        evaluate(compose_evaluate([f"run={run}", "quality.density=prior"]))
    with pytest.raises(UsageError, match="needs a VAE.*quality.samples=0 leaves nothing"):
        evaluate(compose_evaluate([f"run={run}", "quality.samples=0"]))
    with pytest.raises(UsageError, match="quality.k must be an integer >= 1, got quality.k=0"):
        evaluate(compose_evaluate([f"run={run}", "quality.k=0"]))


@pytest.mark.slow  # a subprocess for one message
def test_evaluate_refuses_a_corrupt_classifier_file_by_name(trained_runs, tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT
    from vae_experiments.runs import load_data, load_run

    run = shutil.copytree(trained_runs("vae"), tmp_path / "run")
    metrics_before = (run / "metrics.json").read_bytes()
    _, cfg = load_run(run)
    train = load_data(cfg).splits["train"]
    cache = tmp_path / "cache"
    path = classifier_file(cache, "digits", train.images, train.labels)
    path.parent.mkdir()
    path.write_bytes(b"\0" * 100)  # a copy cut short
    env = {**os.environ, "VAE_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO_ROOT / "scripts" / "evaluate.py"), f"run={run}", "k=2"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: the cached sample-quality classifier {path} cannot be read "
        + errors[0].split("cannot be read ", 1)[1]
    ]
    assert "delete it, and the next evaluation trains a new one" in errors[0]
    assert "Traceback" not in done.stderr
    assert list((run / "analysis").glob("*")) == []  # no call folder left behind
    assert (run / "metrics.json").read_bytes() == metrics_before


def on_unlabelled_data(run):
    """The run's config pointed at synthetic images of the same shape: all labels 0."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / "config.yaml")
    cfg.data.source = {
        "_target_": "vae_experiments.data.Synthetic",
        "image_shape": [1, 8, 8],
        "num_train": 100,
        "num_val": 20,
        "num_test": 40,
    }
    OmegaConf.save(cfg, run / "config.yaml")
    return run


def test_unlabelled_data_has_no_sample_quality(trained_runs, tmp_path, caplog):
    from vae_experiments.cli.evaluate import UsageError, evaluate

    vae = on_unlabelled_data(shutil.copytree(trained_runs("vae"), tmp_path / "vae"))
    with caplog.at_level("WARNING"):
        record = evaluate(compose_evaluate([f"run={vae}", "k=2", "device=cpu"]))
    assert "no sample quality: the training split has a single label (0)" in caplog.text
    assert record["sample_quality"] is None  # the likelihood as before
    assert "test/log_px" in read_metrics(vae) and "test/fd_classifier" not in read_metrics(vae)

    ae = on_unlabelled_data(shutil.copytree(trained_runs("ae"), tmp_path / "ae"))
    before = sorted((ae / "analysis").glob("*"))  # other tests' analyses of the shared run
    with pytest.raises(UsageError, match="no sample quality of Autoencoder: .*single label"):
        evaluate(compose_evaluate([f"run={ae}", "device=cpu"]))
    assert sorted((ae / "analysis").glob("*")) == before  # refused before a folder was claimed
