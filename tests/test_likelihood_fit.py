"""A likelihood that fits the data, numbers that say what they are: the default likelihood chosen
from the data's pixels, the discretized logistic, evaluate's label on log p(x), active units
during training, and the labels of the traversal rows."""

from __future__ import annotations

import logging
import math
import re
from functools import partial

import pytest
import pytorch_lightning as pl
import torch

from tests.conftest import FAST, compose_config, train_run
from vae_experiments.analysis.latent import traversal_codes, traversal_labels
from vae_experiments.analysis.likelihood import (
    ActiveUnits,
    count_active_units,
    describe_log_px,
    evaluate_vae,
    observed_pixel_kind,
)
from vae_experiments.config_checks import choose_likelihood
from vae_experiments.data.datamodule import ImageDataModule
from vae_experiments.models import MLP, VAE, Bernoulli, Gaussian, SquaredError
from vae_experiments.models.likelihoods import DiscretizedLogistic, Laplace
from vae_experiments.pictures import PADDING, image_grid
from vae_experiments.runs import load_run
from vae_experiments.targets import ConfigError, instantiate
from vae_experiments.training.module import CollapseWatch, LitModel, collapse_patience

IMAGE_SHAPE = (1, 8, 8)
LEVELS = torch.arange(256, dtype=torch.float64) / 255  # every value of an 8-bit pixel


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- the default likelihood follows the data ---------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data=digits"], DiscretizedLogistic),  # 17 grey levels: not binary
        (["data=digits", "data.binarize=dynamic"], Bernoulli),
        (["data=mnist"], DiscretizedLogistic),
        (["data=mnist", "data.binarize=static"], Bernoulli),
        (["data=fashion_mnist", "data.binarize=dynamic"], Bernoulli),
        (["data=celeba"], DiscretizedLogistic),  # RGB photographs: Bernoulli before
        (["data=image_folder", "data.source.path=/some/folder"], DiscretizedLogistic),
        (["model=iwae", "data=mnist", "data.binarize=dynamic"], Bernoulli),
        (["model=hvae", "data=celeba"], DiscretizedLogistic),
        # A likelihood chosen by name is kept, on any data; autoencoders keep theirs.
        (["data=celeba", "model/likelihood=gaussian"], Gaussian),
        (["data=digits", "model/likelihood=bernoulli"], Bernoulli),
        (["model=ae", "data=celeba"], SquaredError),
    ],
)
def test_the_default_likelihood_follows_the_data(overrides, expected):
    cfg = compose_config(overrides)  # choose_likelihood(cfg) included, as train() calls it
    assert choose_likelihood(cfg) is None  # done: nothing left to choose
    model = instantiate(cfg.model, key="model", image_shape=[3, 8, 8])
    assert type(model.likelihood) is expected


def test_the_run_config_names_the_likelihood_trained_with(trained_runs):
    """End to end: train() on digits with the default likelihood writes it into config.yaml."""
    model, cfg = load_run(trained_runs("vae"))
    assert cfg.model.likelihood._target_.endswith(".DiscretizedLogistic")
    assert isinstance(model.likelihood, DiscretizedLogistic)


def test_auto_with_an_unknown_likelihood_name_says_which_exist():
    with pytest.raises(ConfigError, match="model.likelihood.eight_bit=discretised is invalid: "):
        compose_config(["model.likelihood.eight_bit=discretised"])  # which calls choose_likelihood


# --- the discretized logistic ------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e-4, 0.01, 0.1, 1.0, 30.0])
@pytest.mark.parametrize("centre", [-0.5, 0.0, 0.3, 0.999, 1.7])
def test_discretized_logistic_sums_to_one_over_the_256_levels(scale, centre):
    likelihood = DiscretizedLogistic(scale, learn_scale=False)
    x = LEVELS.float().view(256, 1, 1, 1)  # every level, as the data hold them (float32)
    log_p = likelihood.log_prob(x, torch.full_like(x, centre))  # (256,)
    assert torch.isfinite(log_p).all() and (log_p <= 0).all()
    assert float(torch.logsumexp(log_p.double(), 0)) == pytest.approx(0.0, abs=1e-5)


def test_discretized_logistic_is_the_logistic_mass_of_each_bin():
    scale, centre = 0.07, 0.4
    cdf = torch.distributions.TransformedDistribution(  # the logistic's CDF, independently
        torch.distributions.Uniform(0.0, 1.0),
        [
            torch.distributions.transforms.SigmoidTransform().inv,
            torch.distributions.transforms.AffineTransform(centre, scale),
        ],
    ).cdf
    levels = LEVELS.float()
    upper = torch.where(levels < 1, cdf(levels + 0.5 / 255), torch.ones(()))
    lower = torch.where(levels > 0, cdf(levels - 0.5 / 255), torch.zeros(()))
    likelihood = DiscretizedLogistic(scale, learn_scale=False)
    x = levels.view(256, 1, 1, 1)
    log_p = likelihood.log_prob(x, torch.full_like(x, centre))
    torch.testing.assert_close(log_p.exp(), upper - lower, atol=1e-6, rtol=1e-4)


def test_discretized_logistic_gradient_matches_finite_differences():
    x = torch.randint(0, 256, (3, 1, 2, 2), generator=seeded()).double() / 255
    x[0, 0, 0] = torch.tensor([0.0, 1.0])  # the two end levels, whose bins take the tails
    output = torch.rand(3, 1, 2, 2, generator=seeded(1), dtype=torch.float64, requires_grad=True)
    likelihood = DiscretizedLogistic(0.05, learn_scale=False).double()

    def log_p(output, log_scale):
        likelihood.log_scale = log_scale  # a buffer: the scale becomes an input of gradcheck
        return likelihood.log_prob(x, output)

    log_scale = torch.tensor(math.log(0.05), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(log_p, (output, log_scale))
    learned = DiscretizedLogistic(0.05, learn_scale=True)
    learned.log_prob(x.float(), output.detach().float()).sum().backward()
    assert torch.isfinite(learned.log_scale.grad)


def test_discretized_logistic_refuses_a_scale_that_is_not_positive():
    with pytest.raises(ConfigError, match="scale=0 is invalid: must be a number > 0"):
        DiscretizedLogistic(0, learn_scale=True)


# --- evaluate says what log p(x) is ------------------------------------------------------------


def test_pixel_kind_of_a_batch():
    grey = torch.randint(0, 256, (4, 1, 8, 8), generator=seeded()).float() / 255
    assert observed_pixel_kind(grey) == "8-bit"
    assert observed_pixel_kind(grey.round()) == "binary"
    assert observed_pixel_kind(grey + 0.5 / 255) == "continuous"


@pytest.mark.parametrize(
    ("likelihood", "data", "meaning", "words"),
    [
        (Bernoulli(), "binary", "likelihood", "a log-likelihood of the binary pixels"),
        (
            Bernoulli(),
            "8-bit",
            "not a likelihood",
            "not a likelihood of the data: the Bernoulli likelihood on 8-bit (256-level) pixels",
        ),
        (Bernoulli(), "continuous", "not a likelihood", "Bernoulli likelihood on continuous"),
        (DiscretizedLogistic(0.1, False), "8-bit", "likelihood", "of the 8-bit (256-level)"),
        (DiscretizedLogistic(0.1, False), "binary", "likelihood", "of the binary pixels"),
        (DiscretizedLogistic(0.1, False), "continuous", "not a likelihood", "on continuous"),
        (Gaussian(0.1, False), "8-bit", "density", "a log-density"),
        (Laplace(0.1), "binary", "density", "a log-density"),
        (SquaredError(), "8-bit", "not a likelihood", "not normalised"),
    ],
)
def test_log_px_is_labelled_by_likelihood_and_data(likelihood, data, meaning, words):
    is_, note = describe_log_px(likelihood, data)
    assert is_ == meaning and words in note
    assert ("no bits/dim" in note) == (meaning != "likelihood")


def vae(likelihood) -> VAE:
    torch.manual_seed(0)
    return VAE(IMAGE_SHAPE, 3, MLP([16]), likelihood, beta=1.0, kl_warmup_steps=0).eval()


@pytest.mark.parametrize(
    ("likelihood", "binary", "meaning"),
    [
        (Bernoulli(), True, "likelihood"),
        (Bernoulli(), False, "not a likelihood"),  # what data=celeba trained before
        (DiscretizedLogistic(0.1, False), False, "likelihood"),
        (Gaussian(0.1, False), False, "density"),
    ],
)
def test_evaluate_vae_reports_bits_per_dim_only_for_a_likelihood_of_the_data(
    likelihood, binary, meaning
):
    x = torch.randint(0, 256, (6, *IMAGE_SHAPE), generator=seeded()).float() / 255
    x = x.round() if binary else x
    result = evaluate_vae(vae(likelihood), [x[:3], x[3:]], k=4, max_batch_elems=2**20)
    assert result["log_px_is"] == meaning
    if meaning == "likelihood":
        assert result["bpd"] == pytest.approx(-result["log_px"] / (64 * math.log(2)))
    else:
        assert result["bpd"] is None


def test_evaluate_command_labels_a_bernoulli_likelihood_on_grey_pixels(tmp_path, capsys):
    """scripts/evaluate.py on a VAE trained with Bernoulli on grey digits: a WARNING line, no
    bits/dim in the table, in metrics.json or in the record."""
    from hydra import compose, initialize_config_dir

    from vae_experiments import read_metrics
    from vae_experiments.cli.evaluate import evaluate
    from vae_experiments.configs import CONFIG_DIR

    run = train_run(
        tmp_path / "run",
        [
            "model/network=mlp",
            "model/likelihood=bernoulli",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=5",
            "logger=none",
        ],
    )
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"run={run}", "k=2", "device=cpu"])
    record = evaluate(cfg, tmp_path / "out")
    out = capsys.readouterr().out
    assert (
        "WARNING: log p(x) is not a likelihood of the data: the Bernoulli likelihood on "
        "8-bit (256-level) pixels" in out
    )
    assert re.search(r"bits/dim +- +none: log p\(x\) is not a likelihood\n", out)
    assert record["metrics"]["bpd"] is None and record["metrics"]["log_px_is"] == "not a likelihood"
    metrics = read_metrics(run)
    assert "test/log_px" in metrics and "test/bpd" not in metrics


# --- active units ------------------------------------------------------------------------------


def test_active_units_from_batches_and_processes_equal_the_whole_split():
    means = torch.randn(50, 6, generator=seeded()) * torch.tensor([1, 0.5, 0.2, 0.05, 0.01, 0])
    expected = count_active_units(means)
    assert expected == 3
    assert int((means.var(0) > 0.01).sum()) == expected
    # Two processes, each with its own batches: their sums add up to the whole split's.
    first, second = ActiveUnits([4, 2]), ActiveUnits([4, 2])
    for batch in means[:20].split(7):
        first.add([batch[:, :4], batch[:, 4:]])
    second.add([means[20:, :4], means[20:, 4:]])
    assert first.counts(first.sums + second.sums) == [3, 0]
    assert ActiveUnits([6]).counts(ActiveUnits([6]).empty_sums("cpu") + first.sums) == [3]


def fit_vae(tmp_path, model: VAE, epochs: int = 1) -> pl.Trainer:
    """One or more short epochs (3 steps each) on the digits, with validation, as train() would
    log them."""
    pl.seed_everything(0)
    data = instantiate(compose_config(FAST).data)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=pl.loggers.CSVLogger(str(tmp_path), name="csv", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=3,
        num_sanity_val_steps=0,
    )
    trainer.fit(LitModel(model, partial(torch.optim.Adam, lr=1e-3)), ImageDataModule(data))
    return trainer


def test_val_active_units_are_logged(tmp_path, caplog):
    model = vae(DiscretizedLogistic(0.1, True)).train()
    with torch.no_grad():  # posterior means that differ between images from the start
        model.encoder.net[-1].weight[:3] *= 30
    trainer = fit_vae(tmp_path, model)
    active = trainer.callback_metrics["val/active_units"]
    assert 0 < float(active) <= 3
    assert "val/active_units" in (tmp_path / "csv" / "metrics.csv").read_text()
    assert "posterior collapse" not in caplog.text


def collapsed_vae() -> VAE:
    """A VAE whose encoder's means ignore the image: its last layer's mean rows zeroed and
    frozen, so that no unit is ever active."""
    model = vae(DiscretizedLogistic(0.1, True)).train()
    last = model.encoder.net[-1]
    with torch.no_grad():
        last.weight[:3].zero_()
        last.bias[:3].zero_()
    last.weight.register_hook(lambda grad: torch.cat([torch.zeros_like(grad[:3]), grad[3:]]))
    last.bias.register_hook(lambda grad: torch.cat([torch.zeros_like(grad[:3]), grad[3:]]))
    return model


def collapse_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "posterior collapse" in r.getMessage()]


def test_collapse_is_warned_about_when_it_persists_and_its_end_is_said():
    # The README's vae_digits run: no active unit in its first validations, then 12 of 16.
    watch = CollapseWatch(patience=3)
    assert [watch.update(n, epoch) for epoch, n in enumerate([0, 0, 5, 12])] == [None] * 4
    assert not watch.at_end()
    # Three validations in a row: warned at the third, once; units opening up again are said.
    watch = CollapseWatch(patience=3)
    events = [watch.update(n, epoch) for epoch, n in enumerate([0, 0, 0, 0, 4, 0])]
    assert events == [None, None, "collapsed", None, "recovered", None]
    assert watch.since == 5 and watch.streak == 1
    assert watch.at_end() and not watch.at_end()  # a run that ends collapsed: once
    # Not during a KL warm-up: its low KL weight is when units open up.
    watch = CollapseWatch(patience=3)
    assert [watch.update(0, epoch, warmup_over=False) for epoch in range(4)] == [None] * 4
    assert watch.update(0, 4, warmup_over=True) == "collapsed"
    assert watch.since == 0 and not watch.at_end()


def test_collapse_patience_grows_with_the_run():
    # The README's 30-epoch MLP VAE on digits has no active unit in its first 4 validations and
    # ends with 12 of 16: a 30-epoch run waits 6, a short one 3, an unlimited one 3.
    assert [collapse_patience(epochs) for epochs in (2, 4, 15, 16, 30, 100)] == [3, 3, 3, 4, 6, 20]
    assert collapse_patience(None) == collapse_patience(-1) == 3
    watch = CollapseWatch(patience=collapse_patience(30))
    assert [watch.update(0, epoch) for epoch in range(4)] == [None] * 4
    assert watch.update(4, 4) is None  # units opened before the warning: nothing to say


def test_a_collapsed_posterior_is_warned_about_once_when_it_persists(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="vae_experiments.training.module"):
        trainer = fit_vae(tmp_path, collapsed_vae(), epochs=4)
    assert float(trainer.callback_metrics["val/active_units"]) == 0
    warnings = collapse_warnings(caplog)
    assert len(warnings) == 1  # at the third validation in a row, not at the first, not again
    assert "val/active_units=0 of 3 in the 3 validations since epoch 0 (step 9)" in warnings[0]
    assert "model.kl_warmup_steps=30" in warnings[0] and "model.beta (now 1)" in warnings[0]


def test_a_short_run_that_ends_collapsed_says_so_at_its_end(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="vae_experiments.training.module"):
        fit_vae(tmp_path, collapsed_vae(), epochs=2)
    (warning,) = collapse_warnings(caplog)
    assert "val/active_units=0 of 3 in the 2 validations since epoch 0 (step 6)" in warning


# --- traversal labels --------------------------------------------------------------------------


def test_traversal_rows_are_labelled_with_their_dimension_and_range():
    codes = torch.randn(200, 3, generator=seeded()) * torch.tensor([1.0, 2.0, 0.5])
    labels = traversal_labels(codes, dims=[0, 2])
    rows = traversal_codes(codes, steps=5, dims=[0, 2]).view(2, 5, 3)
    for label, row, dim in zip(labels, rows, [0, 2], strict=True):
        assert label == f"z{dim}: {float(row[0, dim]):.2g} to {float(row[-1, dim]):.2g}"

    images = torch.full((10, 1, 8, 8), 0.5)  # 2 rows of 5 grey images, 48 px each
    plain = image_grid(list(images.split(5)))
    labelled = image_grid(list(images.split(5)), row_labels=labels)
    margin = labelled.shape[2] - plain.shape[2]
    assert labelled.shape[1] == plain.shape[1] and margin > 20
    torch.testing.assert_close(labelled[:, :, margin:], plain, atol=1 / 255, rtol=0)
    # Text (dark pixels) in the margin beside each row of images, and nowhere else there.
    dark = labelled[:, :, :margin].min(0).values < 0.5  # (H, margin)
    row_height = 48 + PADDING
    for row in range(2):
        band = dark[PADDING + row * row_height : (row + 1) * row_height]
        assert band.any()
    with pytest.raises(ValueError, match="1 row labels for 2 rows"):
        image_grid(list(images.split(5)), row_labels=labels[:1])


def dark_rows(picture: torch.Tensor, margin: int, rows: int, image_side: int = 48) -> list[bool]:
    """For each row of a labelled grid (3, H, W), whether its left margin holds text."""
    dark = picture[:, :, :margin].min(0).values < 0.5  # (H, margin)
    height = image_side + PADDING
    return [bool(dark[PADDING + r * height : (r + 1) * height].any()) for r in range(rows)]


def test_row_labels_are_legible_and_training_grids_say_what_each_row_is(tmp_path):
    from types import SimpleNamespace

    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    from vae_experiments.pictures import label_font
    from vae_experiments.training.callbacks import ImageGrids

    # Pillow's default 10 px font drew a space 1-2 px wide: "z3: -1.6 to0.74".
    assert label_font(48 + PADDING).getlength(" ") >= 3
    grids = ImageGrids(4, tmp_path)
    grids._images = torch.rand(4, 1, 8, 8, generator=seeded())
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, loggers=[], global_step=0)
    grids.on_validation_epoch_end(trainer, SimpleNamespace(model=vae(Bernoulli())))
    plain_width = image_grid([grids._images, grids._images]).shape[2]
    for name in ("reconstructions", "samples"):  # input over reconstruction; prior samples
        picture = pil_to_tensor(Image.open(tmp_path / f"{name}.png").convert("RGB")).float() / 255
        margin = picture.shape[2] - plain_width
        assert margin > 20 and dark_rows(picture, margin, rows=2) == [True, True], name
