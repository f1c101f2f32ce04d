"""The conditional VAE (model=cvae): its bound against a computation by hand, labels from every
labelled source through training, sampling and evaluation, and data without labels refused."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.conftest import REPO_ROOT, compose_config, train_run
from tests.fake_data import write_idx_dataset, write_image_folder
from vae_experiments.analysis.likelihood import evaluate_vae, iwae_log_likelihood
from vae_experiments.models import CVAE, MLP, Bernoulli, Conv
from vae_experiments.targets import ConfigError, instantiate

IMAGE_SHAPE = (1, 8, 8)
CLASSES = 4
# A small MLP CVAE on digits; latent 4, as the classifier test's run.
DIGITS_CVAE = [
    "model=cvae",
    "model/network=mlp",
    "model.network.hidden_dims=[128]",
    "logger=none",
]


def cvae(network=None, k: int = 1) -> CVAE:
    """A CVAE on IMAGE_SHAPE with CLASSES classes, Bernoulli pixels: MLP([16]) unless given."""
    network = MLP([16]) if network is None else network
    return CVAE(IMAGE_SHAPE, CLASSES, 3, network, Bernoulli(), 1.0, 0, k)


def by_hand(model: CVAE, x, y, eps):
    """log p(x | z, y), log p(z) and log q(z | x, y) of z = mu + std * eps, (B,) each, from the
    model's encoder and decoder fed the label as the paper does: a one-hot vector beside the
    flat pixels (MLP) or as constant channels (conv), and appended to z."""
    one_hot = F.one_hot(y, CLASSES).float()  # (B, K)
    if isinstance(model.body, Conv):
        planes = one_hot[:, :, None, None].expand(-1, -1, *IMAGE_SHAPE[1:])
        encoder_input = torch.cat([x, planes], 1)  # (B, C + K, H, W)
    else:
        encoder_input = torch.cat([x.flatten(1), one_hot], 1)[:, None, None]  # (B, 1, 1, N + K)
    mu, logvar = model.encoder(encoder_input).chunk(2, 1)
    std = torch.exp(0.5 * logvar)
    z = mu + std * eps
    logits = model.decoder(torch.cat([z, one_hot], 1))
    p = torch.sigmoid(logits)
    log_px_z = (x * torch.log(p) + (1 - x) * torch.log1p(-p)).flatten(1).sum(1)
    log_pz = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(1)
    log_qz = (-0.5 * eps**2 - 0.5 * math.log(2 * math.pi) - torch.log(std)).sum(1)
    kl = 0.5 * (mu**2 + std**2 - 1 - torch.log(std**2)).sum(1)
    return log_px_z, log_pz, log_qz, kl


@pytest.mark.parametrize("network", [MLP([16]), Conv([4, 8])], ids=["mlp", "conv"])
def test_conditional_elbo_matches_a_computation_by_hand(network):
    torch.manual_seed(0)
    model = cvae(network).eval()
    x = torch.bernoulli(torch.rand(6, *IMAGE_SHAPE))
    y = torch.tensor([0, 1, 2, 3, 0, 2])
    torch.manual_seed(1)
    terms = model.loss(x, y)
    torch.manual_seed(1)
    eps = torch.randn(6, 1, 3)[:, 0]  # the loss's one sample per image
    log_px_z, _, _, kl = by_hand(model, x, y, eps)
    torch.testing.assert_close(terms["recon"], -log_px_z.mean())
    torch.testing.assert_close(terms["kl"], kl.mean())
    torch.testing.assert_close(terms["elbo"], (log_px_z - kl).mean())
    torch.testing.assert_close(terms["loss"], -terms["elbo"])
    # The label is used: the same images as other classes have another bound.
    torch.manual_seed(1)
    assert not torch.allclose(model.loss(x, (y + 1) % CLASSES)["elbo"], terms["elbo"])
    with pytest.raises(ValueError, match="CVAE needs the class labels y"):
        model.loss(x)


def test_conditional_log_likelihood_is_the_importance_weighted_bound_by_hand():
    torch.manual_seed(0)
    model = cvae().eval()
    x = torch.bernoulli(torch.rand(5, *IMAGE_SHAPE))
    y = torch.tensor([3, 1, 0, 2, 1])
    k = 7
    estimate = iwae_log_likelihood(
        model, x, k, max_batch_elems=2**20, generator=torch.Generator().manual_seed(2), y=y
    )
    eps = torch.randn(5, k, 3, generator=torch.Generator().manual_seed(2))  # the same draws
    log_w = []
    for i in range(k):
        log_px_z, log_pz, log_qz, _ = by_hand(model, x, y, eps[:, i])
        log_w.append(log_px_z + log_pz - log_qz)
    log_w = torch.stack(log_w, 1)  # (B, K)
    expected = torch.logsumexp(log_w.double(), 1) - math.log(k)
    torch.testing.assert_close(estimate, expected, rtol=1e-5, atol=1e-4)
    # Evaluation over a split needs the labels beside the images.
    results = evaluate_vae(model, [(x, y)], k=k, max_batch_elems=2**20)
    assert results["conditional"] is True and math.isfinite(results["log_px"])
    with pytest.raises(ValueError, match=r"evaluated on log p\(x \| y\)"):
        evaluate_vae(model, [x], k=k, max_batch_elems=2**20)


def test_sampling_draws_the_asked_classes_and_uniform_ones_without():
    model = cvae().eval()
    generator = torch.Generator().manual_seed(0)
    y = torch.tensor([2, 2, 0])
    z = model.sample_codes(3, torch.Generator().manual_seed(0))
    torch.testing.assert_close(model.sample(3, generator, y=y), model.decode(z, y))
    assert model.sample(9).shape == (9, *IMAGE_SHAPE)


# --- labels from the data -----------------------------------------------------------------------


def test_every_labelled_source_names_its_classes_and_unlabelled_ones_have_none(tmp_path):
    from vae_experiments.data import (
        MNIST,
        CelebA,
        Digits,
        FashionMNIST,
        ImageFolder,
        Synthetic,
    )

    assert Digits(0.1, 0.2).class_names == [str(d) for d in range(10)]
    assert MNIST(tmp_path, 0.1, False).class_names == [str(d) for d in range(10)]
    fashion = FashionMNIST(tmp_path, 0.1, False).class_names
    assert len(fashion) == 10 and fashion[7] == "Sneaker"
    folder = dict(image_size=8, channels=1, val_size=1, test_size=1, cache=False)
    folder |= dict(cache_dir=tmp_path / "cache", skip_corrupt=False, alpha_background=255)
    labelled = write_image_folder(tmp_path / "pets", n=6)
    assert ImageFolder(labelled, **folder, min_size=0).class_names == ["cats", "dogs"]
    flat = write_image_folder(tmp_path / "flat", n=6, classes=())
    assert ImageFolder(flat, **folder, min_size=0).class_names is None
    assert Synthetic([1, 8, 8], 4, 4, 4).class_names is None
    celeba = CelebA(tmp_path, 8, 148, False, tmp_path / "cache", False, 255, 0)
    assert celeba.class_names is None


def test_labels_outside_the_classes_are_refused_when_loaded(tmp_path):
    from vae_experiments.data import MNIST, ImageData

    folder = write_idx_dataset(tmp_path, n_train=32, n_test=8)
    labels = folder / "t10k-labels-idx1-ubyte"
    data = labels.read_bytes()
    labels.write_bytes(data[:-1] + bytes([12]))  # the last test label: 12
    loaded = ImageData(MNIST(tmp_path, 4, False), 8, 0, 0, 0, "none", "auto")
    with pytest.raises(ValueError, match="MNIST's test labels run from .* to 12, but it has 10"):
        loaded.setup()


def test_model_that_needs_labels_gets_the_number_of_classes_from_the_data(tmp_path):
    from vae_experiments.config_checks import supply_num_classes

    cfg = compose_config(["model=cvae"])
    assert supply_num_classes(cfg, instantiate(cfg.data, key="data")) == 10
    assert cfg.model.num_classes == 10
    root = write_image_folder(tmp_path / "pets", n=6, classes=("a", "b", "c"))
    cfg = compose_config(["model=cvae", "data=image_folder", f"data.source.path={root}"])
    assert supply_num_classes(cfg, instantiate(cfg.data, key="data")) == 3
    flat = write_image_folder(tmp_path / "flat", n=6, classes=())
    cfg = compose_config(["model=cvae", "data=image_folder", f"data.source.path={flat}"])
    choices = {"model": "cvae", "data": "image_folder"}
    with pytest.raises(ConfigError, match="^model=cvae needs class labels .* data=image_folder"):
        supply_num_classes(cfg, instantiate(cfg.data, key="data"), choices)
    cfg = compose_config(["model=vae", "data=synthetic"])  # needs none: nothing is set
    assert supply_num_classes(cfg, instantiate(cfg.data, key="data")) is None
    assert "num_classes" not in cfg.model


def test_cvae_on_unlabelled_data_is_refused_at_start_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), "model=cvae", "data=synthetic"]
        + [f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: model=cvae needs class labels (a CVAE), and data=synthetic has none (Synthetic "
        "images are unlabelled: every label is 0); train it on labelled data (data=digits, "
        "data=mnist, data=fashion_mnist, or data=image_folder with a subfolder per class), or "
        "choose a model without labels (model=vae)"
    ]
    assert "Traceback" not in done.stderr
    assert not run_dir.exists()  # nothing left behind: the corrected command runs there


# --- training, sampling and evaluation on digits -----------------------------------------------


def sample_accuracy(run: Path, per_class: int = 20) -> float:
    """The share of a trained run's samples, ``per_class`` of each digit, that a logistic
    regression fitted to the training split's images assigns to the class asked for."""
    from sklearn.linear_model import LogisticRegression

    from vae_experiments.runs import load_data, load_run, load_split

    model, cfg = load_run(run)
    x, y = load_split(load_data(cfg), "train")
    classifier = LogisticRegression(max_iter=2000).fit(x.flatten(1).numpy(), y.numpy())
    asked = torch.arange(10).repeat_interleave(per_class)
    samples = model.sample(len(asked), generator=torch.Generator().manual_seed(0), y=asked)
    return classifier.score(samples.flatten(1).numpy(), asked.numpy())


@pytest.fixture(scope="module")
def digits_cvae(tmp_path_factory) -> Path:
    """A small CVAE trained on digits for 10 epochs (about 5 s), in groups of steps."""
    root = tmp_path_factory.mktemp("cvae")
    return train_run(root / "run", [*DIGITS_CVAE, "trainer.max_epochs=10"])


def test_samples_of_a_briefly_trained_cvae_are_of_the_class_asked(digits_cvae):
    # Chance is 0.1; 10 epochs give about 0.7 (40 give about 0.86: the slow test below).
    assert sample_accuracy(digits_cvae) > 0.5
    # The training grid: a row of samples per class (digits are drawn 48 pixels high).
    grid = Image.open(digits_cvae / "images" / "samples.png")
    assert grid.height == 10 * (48 + 2) + 2


@pytest.mark.slow
def test_samples_of_a_cvae_trained_longer_are_mostly_of_the_class_asked(tmp_path):
    run = train_run(tmp_path / "run", [*DIGITS_CVAE, "trainer.max_epochs=40"])
    assert sample_accuracy(run) > 0.75


def test_labels_reach_the_steps_taken_in_groups_as_one_at_a_time(tmp_path):
    """Groups of steps (steps_per_group) give each step its own batch's labels: the same
    weights as Lightning stepping every batch."""
    from vae_experiments.runs import load_run

    quick = [*DIGITS_CVAE, "trainer.max_epochs=1", "trainer.log_every_n_steps=10"]
    grouped = train_run(tmp_path / "grouped", [*quick, "steps_per_group=10"])
    single = train_run(tmp_path / "single", [*quick, "steps_per_group=1"])
    weights = load_run(grouped, "last")[0].state_dict()
    for name, value in load_run(single, "last")[0].state_dict().items():
        assert torch.equal(weights[name], value), name


def test_sample_command_draws_the_classes_asked(digits_cvae, tmp_path):
    from vae_experiments.cli.sample import UsageError, sample_latents

    report = sample_latents(
        digits_cvae, density="prior", n=16, label=[3, "7"], traversal_dims=2, out_dir=tmp_path / "a"
    )
    assert report["sampled"]["classes"] == ["3", "7"]
    grid = Image.open(report["sampled"]["png"])  # two classes, 8 each: 2 rows of 4 per class
    assert grid.height == 4 * (48 + 2) + 2
    every = sample_latents(digits_cvae, n=64, components=2, out_dir=tmp_path / "b")
    assert every["sampled"]["classes"] == [str(d) for d in range(10)]
    assert Image.open(every["sampled"]["png"]).height == 10 * (48 + 2) + 2
    with pytest.raises(UsageError, match="label=12: 12 is not a class of the run's data"):
        sample_latents(digits_cvae, label=12, out_dir=tmp_path / "c")


def test_sample_command_refuses_labels_it_cannot_draw(digits_cvae, trained_runs, tmp_path):
    from vae_experiments.cli.sample import UsageError, sample_latents

    before = sorted((digits_cvae / "analysis").glob("*"))
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "sample.py"), f"run={digits_cvae}"]
        + ["label=Sneaker"],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: label=Sneaker: Sneaker is not a class of the run's data; give a class number or "
        "name of: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 (or leave label out: all)"
    )
    assert sorted((digits_cvae / "analysis").glob("*")) == before  # no folder left behind
    with pytest.raises(UsageError, match="^label=3: VAE is not conditioned on labels; leave"):
        sample_latents(trained_runs("vae"), label=3, out_dir=tmp_path / "vae")


def test_evaluate_reports_the_conditional_log_likelihood(digits_cvae, tmp_path):
    import shutil

    from hydra import compose, initialize_config_dir

    from vae_experiments.cli.evaluate import evaluate
    from vae_experiments.configs import CONFIG_DIR
    from vae_experiments.runs import read_metrics

    run = shutil.copytree(digits_cvae, tmp_path / "run")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"run={run}", "k=20", "max_images=50"])
    record = evaluate(cfg, tmp_path / "out")
    metrics = read_metrics(run)
    assert record["metrics"]["conditional"] is True
    assert metrics["test/log_px_given_y"] == record["metrics"]["log_px"]
    assert "test/log_px" not in metrics and "test/bpd_given_y" in metrics
    # log p(x | y) >= its ELBO estimate from the same samples.
    assert record["metrics"]["log_px"] >= record["metrics"]["elbo"]
