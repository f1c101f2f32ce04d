"""Training end to end, in process: every model trains, and its run directory holds what it should."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import FAST, MLP_64, MODEL_CONFIGS, compose_config, train_run
from vae_experiments import load_run, read_metrics
from vae_experiments.models.base import squared_error
from vae_experiments.runs import EVENT_FILE_GLOB, tensorboard_dir
from vae_experiments.units import unit_tag

SMALL = ["model.network.channels=[8,16]"]  # the conv network of the deep models, small


def run(tmp_path: Path, overrides: list[str], name: str = "run") -> tuple[dict, Path]:
    """Trains as ``python train.py`` would; returns its metrics and run directory."""
    run_dir = train_run(tmp_path / name, overrides)
    return read_metrics(run_dir), run_dir


VAES = ("vae", "beta_vae", "iwae", "hvae", "cvae", "btcvae", "beta_vae_capacity", "factorvae")
#: Terms a model logs beside its kind's.
EXTRA_TERMS = {
    "iwae": {"iwae_bound"},
    "btcvae": {"mi", "tc", "dim_kl"},
    "beta_vae_capacity": {"capacity"},
    "factorvae": {"tc", "adversary_loss"},
}
#: The VQ-VAE's terms beside the reconstruction's.
VQ_TERMS = {f"test/{term}" for term in ("codebook", "commitment", "perplexity", "codes_in_use")}
#: The bits per code of its prior and of the code frequencies, fitted at the end of training.
VQ_PRIOR = {
    f"{split}/{kind}_bits_per_code"
    for split in ("val", "test")
    for kind in ("prior", "frequencies")
}


def expected_test_metrics(model_name: str) -> set[str]:
    base = {"test/loss", "test/recon", "test/recon_mse"}
    if model_name == "vqvae":
        return base | VQ_TERMS
    if model_name not in VAES:
        return base
    extra = {f"test/{term}" for term in EXTRA_TERMS.get(model_name, ())}
    return base | {"test/kl", "test/elbo"} | extra


def load_test_images(cfg_overrides: list[str]) -> torch.Tensor:
    return load_test_split(cfg_overrides)[0]


def load_test_split(cfg_overrides: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split's images (float) and labels."""
    datamodule = instantiate(compose_config([*FAST, *cfg_overrides]).data)
    datamodule.setup()
    test = datamodule.splits["test"]
    return datamodule.to_float(test.images), test.labels


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_each_model_trains_and_writes_its_run(tmp_path, name):
    overrides = [f"model={name}", *([] if name in ("linear_ae", "hvae") else SMALL)]
    if name == "hvae":  # MLP bodies; sized by latent_dims (FAST's latent_dim is left out)
        overrides += ["model.network.hidden_dims=[32]", "model.latent_dims=[4,2]"]
    if name == "vqvae":  # a small prior, fitted for one epoch
        overrides += ["model.prior.channels=8", "model.prior.layers=2", "model.prior.epochs=1"]
    if name == "factorvae":  # a small discriminator
        overrides += ["model.discriminator_dims=[32,32]"]
    metrics, run_dir = run(tmp_path, overrides)

    expected = expected_test_metrics(name)
    validated = {key.replace("test/", "val/") for key in expected}  # the last validation epoch
    prior = VQ_PRIOR if name == "vqvae" else set()
    validated |= {key for key in prior if key.startswith("val/")}
    expected |= {key for key in prior if key.startswith("test/")}
    assert {key for key in metrics if key.startswith("val/")} - {"val/active_units"} == validated
    assert {key for key in metrics if not key.startswith("val/")} == expected | {
        "epochs",
        "steps",
        "train_seconds",
        "seconds_per_epoch",
        "world_size",
    }
    assert metrics["epochs"] == 2 and metrics["world_size"] == 1
    # digits: 1797 images, 20% test, 10% of the rest for validation; full batches of 32.
    assert metrics["steps"] == 2 * (1294 // 32)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())

    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "images" / "reconstructions.png").is_file()
    assert (run_dir / "images" / "samples.png").is_file() == (name in VAES)

    # The logged test metric is what the reloaded model gives on the test split.
    model, cfg = load_run(run_dir)
    targets = {
        "vae": ".VAE",
        "beta_vae": ".VAE",
        "iwae": ".VAE",
        "hvae": ".HierarchicalVAE",
        "cvae": ".CVAE",
        "vqvae": ".VQVAE",
        "btcvae": ".BetaTCVAE",
        "beta_vae_capacity": ".CapacityVAE",
        "factorvae": ".FactorVAE",
    }
    assert cfg.model._target_.endswith(targets.get(name, ".Autoencoder"))
    assert not model.training
    # The same digits (FAST composes) and their labels, which a CVAE reconstructs with.
    x, y = load_test_split([] if name == "hvae" else overrides)
    with torch.no_grad():
        recon_mse = squared_error(x, model.reconstruct(x, y)).mean()
    assert float(recon_mse) == pytest.approx(metrics["test/recon_mse"], rel=1e-4)

    if name in VAES:
        assert metrics["test/elbo"] == pytest.approx(
            -(metrics["test/recon"] + metrics["test/kl"]), rel=0.05
        )


def test_training_lowers_the_test_error(tmp_path):
    overrides = ["model=ae", *MLP_64, "trainer.max_epochs=3"]
    metrics, _ = run(tmp_path, overrides)
    untrained = instantiate(compose_config(overrides).model, image_shape=[1, 8, 8], _convert_="all")
    x = load_test_images(overrides)
    with torch.no_grad():
        before = float(squared_error(x, untrained.eval().reconstruct(x)).mean())
    assert metrics["test/recon_mse"] < 0.5 * before


def test_same_seed_same_run_and_other_seed_other_run(tmp_path):
    overrides = ["model=vae", *SMALL]
    first, _ = run(tmp_path, [*overrides, "seed=3"], "a")
    second, _ = run(tmp_path, [*overrides, "seed=3"], "b")
    other, _ = run(tmp_path, [*overrides, "seed=4"], "c")
    for metrics in (first, second, other):
        metrics.pop("train_seconds")
        metrics.pop("seconds_per_epoch")
    assert first == second
    assert first != other


def test_tensorboard_gets_scalars_image_grids_and_hparams(tmp_path):
    _, run_dir = run(tmp_path, ["model=vae", *SMALL])
    assert tensorboard_dir(run_dir) == run_dir  # TensorBoard names the run after its folder
    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    tags = events.Tags()
    for stage in ["train", "val", "test"]:
        for term in ["loss", "recon", "recon_mse", "kl", "elbo"]:
            tag = unit_tag(f"{stage}/{term}", "discretized_logistic")  # the digits' default
            assert tag in tags["scalars"], tag
    assert {"images/reconstructions", "images/samples"} <= set(tags["images"])
    # Two validation epochs, two grids each (the sanity check is not logged).
    assert len(events.Images("images/samples")) == 2
    hparams_files = list(run_dir.glob(EVENT_FILE_GLOB))
    assert any(b"_hparams_/session_start_info" in f.read_bytes() for f in hparams_files)
    assert any(b"model.latent_dim" in f.read_bytes() for f in hparams_files)


def test_other_loggers_and_a_scheduler(tmp_path):
    metrics, run_dir = run(tmp_path, ["model=linear_ae", "logger=csv", "scheduler=cosine"], "csv")
    assert (run_dir / "csv" / "metrics.csv").is_file()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 2
    _, run_dir = run(tmp_path, ["model=linear_ae", "logger=none"], "none")
    assert (run_dir / "metrics.json").is_file()
    assert not list(run_dir.rglob(EVENT_FILE_GLOB))


def test_load_run_accepts_a_checkpoint_path_and_last(tmp_path):
    _, run_dir = run(tmp_path, ["model=linear_ae"])
    best, _ = load_run(run_dir)
    last, _ = load_run(run_dir, checkpoint="last")
    from_file, _ = load_run(run_dir / "checkpoints" / "last.ckpt")
    for key, value in last.state_dict().items():
        assert torch.equal(value, from_file.state_dict()[key])
    assert set(best.state_dict()) == set(last.state_dict())
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_run(tmp_path)


def test_metrics_file_is_flat_json(tmp_path):
    _, run_dir = run(tmp_path, ["model=linear_ae"])
    data = json.loads((run_dir / "metrics.json").read_text())
    assert all(isinstance(v, int | float) for v in data.values())


@pytest.mark.parametrize(
    "override, choices",
    [
        ("model=vea", ["ae", "denoising_ae", "linear_ae", "vae"]),
        ("data=mnits", ["digits", "mnist", "fashion_mnist", "celeba", "image_folder"]),
        ("trainer=tpu", ["cpu", "ddp", "default", "gpu"]),
    ],
)
def test_unknown_group_option_lists_the_available_ones(override, choices):
    with pytest.raises(MissingConfigException) as error:
        compose_config([override])
    for choice in choices:
        assert choice in str(error.value)


def test_term_means_weight_by_images_and_reduce_over_processes():
    from vae_experiments.training.module import TermMeans

    means = TermMeans()
    assert means.pop() == {}
    means.add({"loss": torch.tensor(1.0), "kl": torch.tensor(4.0)}, batch_size=3)
    means.add({"loss": torch.tensor(2.0), "kl": torch.tensor(0.0)}, batch_size=1)
    result = means.pop()
    assert list(result) == ["loss", "kl"]
    assert float(result["loss"]) == pytest.approx((3 * 1.0 + 1 * 2.0) / 4)
    assert float(result["kl"]) == pytest.approx(12.0 / 4)
    assert means.pop() == {}  # popped means start afresh

    class TwoProcesses:  # another process added one image with loss 10 and kl 2
        def reduce(self, tensor, reduce_op):
            assert reduce_op == "sum"
            # (sums, images) per term
            return tensor + torch.tensor([[10.0, 2.0], [1.0, 1.0]])

    means.add({"loss": torch.tensor(2.0), "kl": torch.tensor(1.0)}, batch_size=4)
    result = means.pop(TwoProcesses())
    assert float(result["loss"]) == pytest.approx((8.0 + 10.0) / 5)
    assert float(result["kl"]) == pytest.approx((4.0 + 2.0) / 5)


def test_term_means_of_batches_with_fewer_terms_count_only_the_batches_that_had_them():
    """Training steps nobody logs leave the monitoring terms out (``monitor=False``): each
    term's mean is over the images of the batches that had it, and the non-finite record
    still names the step and the term."""
    from vae_experiments.training.module import TermMeans

    means = TermMeans()
    means.add({"loss": torch.tensor(1.0), "kl": torch.tensor(2.0)}, batch_size=2, step=0)
    means.add(
        {"loss": torch.tensor(3.0), "kl": torch.tensor(4.0), "elbo": torch.tensor(-5.0)},
        batch_size=2,
        step=1,
    )
    means.add({"loss": torch.tensor(5.0), "kl": torch.tensor(math.inf)}, batch_size=4, step=2)
    result = means.pop()
    assert list(result) == ["loss", "kl", "elbo"]
    assert float(result["loss"]) == pytest.approx((2 + 6 + 20) / 8)
    assert float(result["elbo"]) == -5.0  # its one batch only
    fault = means.first_nonfinite()
    assert (fault.step, fault.values) == (2, {"kl": math.inf})
    # After a reset, a term no batch had is left out rather than reported as 0/0.
    means.add({"loss": torch.tensor(1.0), "kl": torch.tensor(1.0)}, batch_size=1, step=3)
    assert list(means.pop()) == ["loss", "kl"]


def test_train_terms_are_logged_at_the_logging_interval(tmp_path):
    import csv

    overrides = ["model=ae", *SMALL, "logger=csv", "trainer.log_every_n_steps=5"]
    metrics, run_dir = run(tmp_path, overrides)
    with open(run_dir / "csv" / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("train/loss")]
    # 80 steps: one point per 5 steps, at steps 4, 9, ..., 79 (Lightning counts from 0).
    assert metrics["steps"] == 80
    assert [int(row["step"]) for row in rows] == list(range(4, 80, 5))
    losses = [float(row["train/loss"]) for row in rows]
    assert losses[-1] < losses[0]


def test_channels_last_trains_a_conv_model_like_nchw(tmp_path):
    # Bernoulli: a learned likelihood scale would amplify the kernels' rounding differences.
    vae = ["model=vae", "model/likelihood=bernoulli", *SMALL]
    nhwc, run_dir = run(tmp_path, [*vae, "channels_last=true"], "nhwc")
    nchw, _ = run(tmp_path, [*vae, "channels_last=false"], "nchw")
    for key in ("test/loss", "test/recon_mse", "test/kl"):  # other kernels, the same training
        assert nhwc[key] == pytest.approx(nchw[key], rel=1e-2), key
    model, _ = load_run(run_dir)  # a plain model again, in the default memory format
    x = load_test_images(["model=vae"])[:4]
    assert model.reconstruct(x).shape == x.shape


@pytest.mark.slow
def test_compiled_loss_trains_like_the_eager_one(tmp_path, monkeypatch):
    # Inductor draws its own random numbers unless told to use eager's; with them, the compiled
    # run must follow the eager one up to float rounding.
    monkeypatch.setattr("torch._inductor.config.fallback_random", True)
    overrides = [
        "model=vae",
        "model/network=mlp",
        "model.network.hidden_dims=[32]",
        "trainer.max_epochs=2",
    ]
    eager, _ = run(tmp_path, overrides, "eager")
    compiled, _ = run(tmp_path, [*overrides, "compile=true"], "compiled")
    for key in ("test/loss", "test/recon_mse", "test/kl"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-3), key


def test_lightnings_per_hook_attribute_bypasses_module_setattr(monkeypatch):
    from vae_experiments.targets import instantiate as build
    from vae_experiments.training import lightning_compat
    from vae_experiments.training.module import LitModel

    cfg = compose_config([*FAST, *MLP_64])
    model = build(cfg.model, key="model", image_shape=[1, 8, 8])
    lit = LitModel(model, lambda params: torch.optim.Adam(params))
    layer = torch.nn.Linear(1, 1)
    calls = []
    original = torch.nn.Module.__setattr__
    monkeypatch.setattr(
        torch.nn.Module,
        "__setattr__",
        lambda module, name, value: calls.append(name) or original(module, name, value),
    )
    (name,) = lightning_compat.HOOK_NAME_ATTRIBUTES
    setattr(lit, name, "training_step")
    assert getattr(lit, name) == "training_step" and calls == []
    lit.extra = layer  # everything else still goes through nn.Module
    assert calls == ["extra"] and "extra" in lit._modules


def test_run_checkpoint_skips_the_step_hook_unless_it_saves_within_epochs(tmp_path, monkeypatch):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint

    from vae_experiments.training.callbacks import RunCheckpoint

    calls = []
    original = ModelCheckpoint.on_train_batch_end

    def count(self, *args, **kwargs):
        calls.append(self.filename)
        original(self, *args, **kwargs)

    monkeypatch.setattr(ModelCheckpoint, "on_train_batch_end", count)
    per_epoch = RunCheckpoint(dirpath=tmp_path, filename="last", monitor=None)
    per_step = RunCheckpoint(
        dirpath=tmp_path, filename="{step}", every_n_train_steps=1, save_top_k=-1
    )

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.ones(6, 2))
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[per_epoch, per_step],
        default_root_dir=tmp_path,
    )
    trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=2))
    assert calls == ["{step}"] * 3  # only the callback that saves within epochs ran it
    assert sorted(p.name for p in tmp_path.glob("step=*.ckpt")) == [
        "step=1.ckpt",
        "step=2.ckpt",
        "step=3.ckpt",
    ]
    assert (tmp_path / "last.ckpt").is_file()


@pytest.mark.parametrize("warmup", [2000, 20])
def test_a_kl_warmup_longer_than_the_run_is_warned_about_at_its_start(tmp_path, caplog, warmup):
    import logging

    overrides = ["model=vae", *MLP_64, "trainer.max_epochs=1", f"model.kl_warmup_steps={warmup}"]
    overrides += ["logger=none", "callbacks.image_grids.num_images=0"]
    with caplog.at_level(logging.WARNING, logger="vae_experiments.training.module"):
        metrics, _ = run(tmp_path, overrides)
    steps = metrics["steps"]  # 1,294 training digits in batches of 32 (FAST): 41 steps
    warnings = [r.getMessage() for r in caplog.records if "kl_warmup_steps" in r.getMessage()]
    if warmup < steps:
        assert warnings == []
        return
    (warning,) = warnings
    assert warning.startswith(
        f"model.kl_warmup_steps=2000 is longer than the whole run, {steps} steps "
        f"(trainer.max_epochs=1 x {steps} steps per epoch): the KL weight rises only to "
        f"{steps / 2000:.2g} of model.beta=1 by the last step"
    )
    assert f"Lower model.kl_warmup_steps (e.g. {steps // 10}" in warning


def test_a_model_whose_loss_takes_no_monitor_keyword_trains_as_before(tmp_path, monkeypatch):
    """A model written to the earlier ``loss(x, y, step)`` gets every step in full."""
    from vae_experiments.models import VAE

    original = VAE.loss
    calls = []

    def loss(self, x, y=None, step=None):  # the signature README gave before ``monitor``
        calls.append(step)
        return original(self, x, y, step)

    monkeypatch.setattr(VAE, "loss", loss)
    metrics, _ = run(tmp_path, ["model=vae", *SMALL, "trainer.max_epochs=1"])
    assert metrics["steps"] == 1294 // 32 and "test/elbo" in metrics
    assert len([step for step in calls if step is not None]) == metrics["steps"]
