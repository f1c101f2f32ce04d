"""Data package: every source on tiny seeded files in the real on-disk formats, the batch
sampler, binarisation, and the configs in ``configs/data/``."""

from __future__ import annotations

import gzip
import re
import socket
import subprocess
import sys
import time
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue
from PIL import Image

from tests.conftest import REPO_ROOT, compose_config
from tests.fake_data import (
    IDX_NAMES,
    idx_bytes,
    write_celeba,
    write_idx,
    write_idx_dataset,
    write_image_folder,
)
from vae_experiments import targets
from vae_experiments.configs import CONFIG_DIR
from vae_experiments.data import (
    MNIST,
    CelebA,
    Digits,
    FashionMNIST,
    ImageData,
    ImageFiles,
    ImageFolder,
    ShuffledBatchSampler,
    Synthetic,
    TensorImages,
    iterate_split,
    read_idx,
)
from vae_experiments.data.datamodule import ImageDataModule
from vae_experiments.data.files import CenterCropResize
from vae_experiments.targets import ConfigError

DATA_CONFIG_DIR = Path(CONFIG_DIR) / "data"
DATA_CONFIGS = sorted(p.stem for p in DATA_CONFIG_DIR.glob("*.yaml"))
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
LOADER_KEYS = (
    "batch_size",
    "eval_batch_size",
    "num_workers",
    "seed",
    "split_seed",
    "binarize",
    "on_device",
)


def make_data(source: type, source_kwargs: dict, **overrides) -> ImageData:
    """``ImageData(source(**source_kwargs))``; ``overrides`` may name loader or source keys."""
    loader = dict(num_workers=0, seed=0, split_seed=0, binarize="none", on_device="auto")
    loader.update({k: overrides.pop(k) for k in LOADER_KEYS if k in overrides})
    return ImageData(source(**{**source_kwargs, **overrides}), **loader)


def make_digits(**overrides) -> ImageData:
    return make_data(Digits, dict(val_size=0.1, test_size=0.2), **{"batch_size": 16, **overrides})


def make_idx(data_dir: Path, cls: type = MNIST, **overrides) -> ImageData:
    kwargs = dict(data_dir=str(data_dir), val_size=16, download=False)
    return make_data(cls, kwargs, **{"batch_size": 8, **overrides})


def make_celeba(data_dir: Path, **overrides) -> ImageData:
    kwargs = dict(
        data_dir=str(data_dir),
        image_size=64,
        crop_size=148,
        cache=True,
        cache_dir=str(data_dir / "cache"),
        skip_corrupt=False,
        alpha_background=255,
        min_size=0,
    )
    return make_data(CelebA, kwargs, **{"batch_size": 4, **overrides})


def make_folder(path: Path, **overrides) -> ImageData:
    kwargs = dict(
        path=str(path),
        image_size=16,
        channels=3,
        val_size=0.1,
        test_size=0.1,
        cache=True,
        cache_dir=str(path / ".cache"),  # hidden: not collected as images
        skip_corrupt=False,
        alpha_background=255,
        min_size=0,
    )
    return make_data(ImageFolder, kwargs, **{"batch_size": 4, **overrides})


def all_batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader)


# --- datasets -------------------------------------------------------------------------------


def test_tensor_images_gathers_a_batch():
    images = torch.arange(5 * 4, dtype=torch.uint8).reshape(5, 1, 2, 2)
    dataset = TensorImages(images, torch.arange(5))
    x, y = dataset[torch.tensor([4, 0])]
    assert len(dataset) == 5
    assert x.dtype == torch.uint8 and x.shape == (2, 1, 2, 2)
    assert torch.equal(x, images[[4, 0]]) and y.tolist() == [4, 0] and y.dtype == torch.int64


def test_tensor_images_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        TensorImages(torch.zeros(2, 1, 2, 2), torch.zeros(2))


# --- sampler --------------------------------------------------------------------------------


def test_eval_sampler_covers_every_index_once_in_order():
    sampler = ShuffledBatchSampler(10, 3, shuffle=False, drop_last=False, seed=0)
    batches = list(sampler)
    assert len(sampler) == 4 and [len(b) for b in batches] == [3, 3, 3, 1]
    assert all(b.dtype == torch.int64 and b.ndim == 1 for b in batches)
    assert torch.equal(torch.cat(batches), torch.arange(10))


def test_shuffle_depends_only_on_seed_and_epoch():
    sampler = ShuffledBatchSampler(20, 5, shuffle=True, drop_last=True, seed=3)
    epoch0 = torch.cat(list(sampler))
    sampler.set_epoch(1)
    epoch1 = torch.cat(list(sampler))
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(epoch1.sort().values, torch.arange(20))  # a permutation
    expected = torch.randperm(20, generator=torch.Generator().manual_seed(3 + 1))
    assert torch.equal(epoch1, expected)
    again = ShuffledBatchSampler(20, 5, shuffle=True, drop_last=True, seed=3)
    again.set_epoch(1)
    assert torch.equal(torch.cat(list(again)), epoch1)


def test_train_shards_are_disjoint_and_equal_length():
    shards = [
        list(ShuffledBatchSampler(21, 4, True, True, seed=0, rank=rank, world_size=2))
        for rank in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 2  # 21 -> 20 -> 10 per rank -> 2 full batches
    assert all(len(b) == 4 for shard in shards for b in shard)
    first, second = (set(torch.cat(shard).tolist()) for shard in shards)
    assert not first & second
    lengths = [len(ShuffledBatchSampler(21, 4, True, True, 0, r, 2)) for r in (0, 1)]
    assert lengths == [2, 2]


def test_eval_shards_cover_everything_once():
    shards = [list(ShuffledBatchSampler(5, 2, False, False, 0, r, 2)) for r in (0, 1)]
    assert [torch.cat(s).tolist() for s in shards] == [[0, 2, 4], [1, 3]]


def test_rank_and_world_size_are_resolved_lazily(monkeypatch):
    sampler = ShuffledBatchSampler(40, 5, shuffle=True, drop_last=True, seed=0)
    assert len(sampler) == 8  # no process group: rank 0 of 1
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    assert len(sampler) == 2 and len(list(sampler)) == 2


@pytest.mark.parametrize(("world_size", "per_process"), [(1, 16), (2, 8)], ids=["single", "ddp2"])
def test_batch_larger_than_training_split_becomes_one_full_batch(world_size, per_process):
    sampler = ShuffledBatchSampler(16, 64, True, True, seed=0, rank=0, world_size=world_size)
    batches = list(sampler)
    assert len(sampler) == 1 and len(batches) == 1
    assert len(batches[0]) == per_process


def test_validation_and_test_batches_have_their_own_size():
    """data.eval_batch_size: evaluation keeps no graph, so its batches may be larger than
    training's; auto is the larger of batch_size and 500."""
    from vae_experiments.data.images import AUTO_EVAL_BATCH_SIZE

    assert make_digits(batch_size=16).eval_batch_size == AUTO_EVAL_BATCH_SIZE == 500
    assert make_digits(batch_size=600).eval_batch_size == 600
    data = make_digits(batch_size=16, eval_batch_size=100)
    module = ImageDataModule(data)
    module.setup()
    train_sizes = {len(images) for images, _ in module.train_dataloader()}
    val_sizes = [len(images) for images, _ in module.val_dataloader()]
    test_sizes = [len(images) for images, _ in iterate_split(data, "test")]
    assert train_sizes == {16}
    assert val_sizes == [100, len(data.splits["val"]) - 100]
    assert test_sizes[0] == 100 and sum(test_sizes) == len(data.splits["test"])
    for bad in (0, "big", True):
        with pytest.raises(ConfigError, match="eval_batch_size"):
            make_digits(eval_batch_size=bad)


def test_empty_training_shard_fails_clearly():
    sampler = ShuffledBatchSampler(1, 8, True, True, seed=0, rank=0, world_size=2)
    with pytest.raises(ValueError, match="has no image for each of the processes"):
        len(sampler)


# --- validation -----------------------------------------------------------------------------


def digits_node(**overrides) -> dict:
    """A ``data:`` config node of digits; ``overrides`` may name loader or source keys."""
    source = {"_target_": "vae_experiments.data.Digits", "val_size": 0.1, "test_size": 0.2}
    source.update({k: overrides.pop(k) for k in ("val_size", "test_size") if k in overrides})
    loader = dict(
        batch_size=16, num_workers=0, seed=0, split_seed=0, binarize="none", on_device="auto"
    )
    return {"_target_": "vae_experiments.data.ImageData", **loader, **overrides, "source": source}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_size": 0}, "data.batch_size=0 is invalid: must be an integer >= 1"),
        ({"num_workers": -1}, "data.num_workers=-1 is invalid: must be an integer >= 0"),
        ({"seed": "0"}, "data.seed=0 is invalid: must be an integer"),
        (
            {"binarize": "sometimes"},
            "data.binarize=sometimes is invalid: must be one of none, static, dynamic",
        ),
        ({"on_device": "gpu"}, "data.on_device=gpu is invalid: must be one of auto, true, false"),
        ({"val_size": 1.5}, "data.source.val_size=1.5 is invalid: must be an int >= 0"),
        ({"test_size": -3}, "data.source.test_size=-3 is invalid: must be an int >= 0"),
    ],
)
def test_bad_config_values_fail_in_init_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        targets.instantiate(digits_node(**overrides), key="data")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_size": 0}, "batch_size=0 is invalid: must be an integer >= 1"),
        ({"binarize": "sometimes"}, "binarize=sometimes is invalid: must be one of none, static"),
        ({"on_device": "gpu"}, "on_device=gpu is invalid: must be one of auto, true, false"),
        ({"test_size": -3}, "test_size=-3 is invalid: must be an int >= 0"),
    ],
)
def test_constructors_check_their_values_without_targets(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_digits(**overrides)


def test_split_that_leaves_no_training_images_fails():
    with pytest.raises(ValueError, match=r"data.source.test_size=1797 .* leaves none for training"):
        make_digits(test_size=1797).setup()


# --- digits ---------------------------------------------------------------------------------


def test_digits_splits_shapes_and_values():
    datamodule = make_digits()
    assert datamodule.image_shape == (1, 8, 8)
    datamodule.setup()
    splits = datamodule.splits
    # test = round(0.2 * 1797) = 359, val = round(0.1 * 1438) = 144
    assert {k: len(v) for k, v in splits.items()} == {"train": 1294, "val": 144, "test": 359}
    for split in splits.values():
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (1, 8, 8)
        assert split.labels.dtype == torch.int64 and set(split.labels.tolist()) == set(range(10))
    x = datamodule.to_float(splits["train"].images)
    assert x.dtype == torch.float32 and x.min() == 0.0 and x.max() == 1.0
    loaders = ImageDataModule(datamodule)
    images, labels = next(iter(loaders.train_dataloader()))
    assert images.shape == (16, 1, 8, 8) and images.dtype == torch.uint8 and labels.shape == (16,)
    assert len(loaders.train_dataloader()) == 1294 // 16
    assert sum(len(b[0]) for b in loaders.val_dataloader()) == 144


def test_digits_splits_depend_on_split_seed_only():
    def val_labels(**overrides) -> list[int]:
        datamodule = make_digits(**overrides)
        datamodule.setup()
        return datamodule.splits["val"].labels.tolist()

    assert val_labels() == val_labels(seed=123)
    assert val_labels() != val_labels(split_seed=1)


def test_setup_runs_once():
    data = make_digits()
    datamodule = ImageDataModule(data)
    datamodule.setup("fit")
    splits = data.splits
    datamodule.setup("test")
    data.setup()
    assert data.splits is splits


# --- binarisation ---------------------------------------------------------------------------


def values(dataset: TensorImages) -> set[int]:
    return set(dataset.images.unique().tolist())


def test_static_binarize_is_deterministic_0_255():
    first, second = make_digits(binarize="static"), make_digits(binarize="static")
    first.setup()
    second.setup()
    for name in ("train", "val", "test"):
        assert values(first.splits[name]) == {0, 255}
        assert torch.equal(first.splits[name].images, second.splits[name].images)


def test_dynamic_binarize_keeps_train_grey_and_fixes_eval_splits():
    dynamic, static = make_digits(binarize="dynamic"), make_digits(binarize="static")
    dynamic.setup()
    static.setup()
    assert len(values(dynamic.splits["train"])) > 2
    for name in ("val", "test"):
        assert values(dynamic.splits[name]) == {0, 255}
        assert torch.equal(dynamic.splits[name].images, static.splits[name].images)


@pytest.mark.parametrize(
    ("binarize", "trainer", "binary"),
    [
        ("dynamic", SimpleNamespace(training=True, current_epoch=0), True),
        ("dynamic", SimpleNamespace(training=False), False),
        ("dynamic", None, False),
        ("none", SimpleNamespace(training=True, current_epoch=0), False),
    ],
)
def test_on_after_batch_transfer(binarize, trainer, binary):
    torch.manual_seed(0)
    datamodule = ImageDataModule(make_digits(binarize=binarize))
    datamodule.setup()
    datamodule.trainer = trainer
    batch = next(iter(datamodule.train_dataloader()))
    x, labels = datamodule.on_after_batch_transfer(batch, 0)
    assert x.dtype == torch.float32 and x.shape == (16, 1, 8, 8) and labels is batch[1]
    if binary:
        assert set(x.unique().tolist()) <= {0.0, 1.0}
    else:
        assert torch.equal(x, batch[0].float() / 255) and len(x.unique()) > 2


class _Recorder(pl.LightningModule):
    """Records what the batches look like inside the steps of a real Trainer."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(64, 1)
        self.seen: dict[str, list[torch.Tensor]] = {"train": [], "val": []}

    def training_step(self, batch, batch_idx):
        self.seen["train"].append(batch[0])
        return self.layer(batch[0].flatten(1)).mean()

    def validation_step(self, batch, batch_idx):
        self.seen["val"].append(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_lightning_trainer_converts_binarizes_and_reshuffles():
    datamodule = ImageDataModule(make_digits(binarize="dynamic", batch_size=64))
    module = _Recorder()
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    trainer.fit(module, datamodule=datamodule)
    for x in module.seen["train"] + module.seen["val"]:
        assert x.dtype == torch.float32 and set(x.unique().tolist()) <= {0.0, 1.0}
    assert trainer.train_dataloader.sampler.epoch == 1  # Lightning called set_epoch
    # Each epoch draws a different permutation, so the first batches differ.
    assert not torch.equal(module.seen["train"][0], module.seen["train"][2])


# --- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_read_idx_round_trip(tmp_path, gz):
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28)).astype(np.uint8)
    path = write_idx(tmp_path / "images-idx3-ubyte", images, gz=gz)
    labels_path = write_idx(tmp_path / "labels-idx1-ubyte", np.array([1, 2, 3]), gz=gz)
    assert np.array_equal(read_idx(path).numpy(), images)
    assert read_idx(labels_path).tolist() == [1, 2, 3]


def test_read_idx_bad_magic_names_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x0c\x03" + bytes(16))
    with pytest.raises(ValueError, match=rf"{path}: bad IDX magic number 0x00000c03"):
        read_idx(path)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_read_idx_truncated_names_the_file(tmp_path, gz):
    data = idx_bytes(np.zeros((4, 28, 28), dtype=np.uint8))
    path = tmp_path / ("images.gz" if gz else "images")
    if gz:
        # A download cut short: the gzip stream ends early.
        path.write_bytes(gzip.compress(data)[:40])
    else:
        path.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=rf"{path}: .*truncated"):
        read_idx(path)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("layout", ["torchvision", "flat"])
@pytest.mark.parametrize("cls", [MNIST, FashionMNIST])
def test_idx_datamodule_loads_both_layouts(tmp_path, gz, layout, cls):
    folder = write_idx_dataset(tmp_path, gz=gz, layout=layout, name=cls.name)
    datamodule = make_idx(tmp_path, cls)
    assert datamodule.image_shape == (1, 28, 28)
    datamodule.setup()
    splits = datamodule.splits
    assert {k: len(v) for k, v in splits.items()} == {"train": 48, "val": 16, "test": 32}
    suffix = ".gz" if gz else ""
    expected = read_idx(folder / (IDX_NAMES["test_images"] + suffix))
    assert torch.equal(splits["test"].images, expected.unsqueeze(1))
    train_val = torch.cat([splits["train"].labels, splits["val"].labels]).sort().values
    written = read_idx(folder / (IDX_NAMES["train_labels"] + suffix)).long().sort().values
    assert torch.equal(train_val, written)
    images, labels = next(iter(ImageDataModule(datamodule).val_dataloader()))
    assert images.shape == (16, 1, 28, 28) and images.dtype == torch.uint8  # one eval batch
    assert labels.dtype == torch.int64 and labels.max() <= 9


def test_idx_missing_files_lists_searched_folders(tmp_path):
    data_dir = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError) as info:
        make_idx(data_dir).setup()
    message = str(info.value)
    assert f"in {data_dir / 'MNIST' / 'raw'}, {data_dir}. " in message
    assert "data.source.download=true" in message and "\n" not in message


def test_idx_folder_missing_one_file_is_not_used(tmp_path):
    folder = write_idx_dataset(tmp_path)
    (folder / IDX_NAMES["test_labels"]).unlink()
    with pytest.raises(FileNotFoundError, match="not found"):
        make_idx(tmp_path).setup()


def test_fashion_missing_files_suggests_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(FashionMNIST, "fallback_dirs", (tmp_path / "x",))
    with pytest.raises(FileNotFoundError) as info:
        make_idx(tmp_path, FashionMNIST).setup()
    assert str(tmp_path / "x") in str(info.value)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)


def test_prepare_data_downloads_only_when_allowed_and_missing(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    def fake_mnist(root, train, download):
        calls.append((root, train, download))
        write_idx_dataset(Path(root), gz=True)  # where torchvision would put them

    monkeypatch.setattr(torchvision.datasets, "MNIST", fake_mnist)
    make_idx(tmp_path, download=False).prepare()
    assert calls == []
    datamodule = make_idx(tmp_path, download=True)
    ImageDataModule(datamodule).prepare_data()  # Lightning's hook prepares the data
    assert calls == [(str(tmp_path), True, True)]
    datamodule.prepare()  # files are there now
    assert len(calls) == 1
    datamodule.setup()
    assert len(datamodule.splits["test"]) == 32


OFFLINE = urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))
# What torchvision raises after trying each of its mirrors.
MIRRORS_FAILED = RuntimeError(
    "Error downloading train-images-idx3-ubyte.gz:\nTried https://ossci-datasets.s3.amazonaws"
    ".com/mnist/, got:\n<urlopen error [Errno -2] Name or service not known>\n"
)


@pytest.mark.parametrize("error", [OFFLINE, MIRRORS_FAILED], ids=["URLError", "RuntimeError"])
@pytest.mark.parametrize("source", [MNIST, FashionMNIST], ids=["mnist", "fashion"])
def test_download_offline_gives_the_ways_to_get_the_files_without_one(
    tmp_path, monkeypatch, source, error
):
    import torchvision.datasets

    def offline(root, train, download):
        raise error

    monkeypatch.setattr(source, "fallback_dirs", ())
    monkeypatch.setattr(torchvision.datasets, source.name, offline)
    with pytest.raises(FileNotFoundError) as info:
        ImageDataModule(make_idx(tmp_path, source, download=True)).prepare_data()
    message = str(info.value)
    assert message.startswith(f"data.source.download=true could not download {source.name} ")
    assert "Name or service not known" in message
    with pytest.raises(FileNotFoundError) as missing:
        make_idx(tmp_path, source).setup()
    # The same folders and offline ways as the message for missing files (the Debian package
    # for Fashion-MNIST).
    ways = str(missing.value).split(". Looked for ", 1)[1]
    assert message.endswith(f". Looked for {ways}") and str(tmp_path / source.name) in ways


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason=f"{FASHION_DIR} not installed")
def test_real_fashion_mnist_from_debian_fallback(tmp_path):
    start = time.perf_counter()
    datamodule = make_idx(tmp_path / "empty", FashionMNIST, val_size=5000)
    datamodule.setup()
    splits = datamodule.splits
    assert {k: len(v) for k, v in splits.items()} == {"train": 55000, "val": 5000, "test": 10000}
    assert splits["train"].images.shape[1:] == datamodule.image_shape == (1, 28, 28)
    assert torch.bincount(splits["test"].labels).tolist() == [1000] * 10
    assert time.perf_counter() - start < 5  # else mark it slow


# --- files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_error_names_the_file(tmp_path, damage):
    image_dir = write_celeba(tmp_path, n=6)
    bad = image_dir / "000002.jpg"
    data = bad.read_bytes()
    bad.write_bytes(b"not a jpeg" * 10 if damage == "garbage" else data[: len(data) // 2])
    dataset = ImageFiles(sorted(image_dir.iterdir()), [0] * 6, CenterCropResize(148, 64), 3, 255)
    assert dataset[torch.tensor([0])][0].shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match=rf"{bad}: image file is corrupt or unreadable"):
        dataset[torch.tensor([0, 1])]


# --- CelebA ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "per_file"])
@pytest.mark.parametrize("kaggle", [False, True], ids=["torchvision", "kaggle"])
def test_celeba_layouts_and_partition(tmp_path, kaggle, cache):
    write_celeba(tmp_path, n=12, kaggle=kaggle)
    datamodule = make_celeba(tmp_path, cache=cache)
    assert datamodule.image_shape == (3, 64, 64)
    datamodule.setup()
    assert {k: len(v) for k, v in datamodule.splits.items()} == {"train": 8, "val": 2, "test": 2}
    assert [p.name for p in datamodule.source.split_paths["val"]] == ["000009.jpg", "000010.jpg"]
    assert isinstance(datamodule.splits["val"], TensorImages if cache else ImageFiles)
    batches = all_batches(ImageDataModule(datamodule).train_dataloader())
    assert len(batches) == 2
    for images, labels in batches:
        assert images.shape == (4, 3, 64, 64) and images.dtype == torch.uint8
        assert labels.tolist() == [0] * 4


def test_celeba_data_dir_may_be_the_celeba_folder(tmp_path):
    write_celeba(tmp_path, n=6)
    datamodule = make_celeba(tmp_path / "celeba", image_size=32)
    datamodule.setup()
    images, _ = datamodule.splits["test"][torch.tensor([0])]
    assert images.shape == (1, 3, 32, 32) == (1, *datamodule.image_shape)


def test_celeba_crop_then_resize_matches_pil(tmp_path):
    image_dir = write_celeba(tmp_path, n=6)
    datamodule = make_celeba(tmp_path)
    datamodule.setup()
    images, _ = datamodule.splits["train"][torch.tensor([0])]
    photo = np.asarray(Image.open(image_dir / "000001.jpg"))  # (218, 178, 3)
    crop = Image.fromarray(photo[35:183, 15:163])  # central 148 x 148
    expected = np.asarray(crop.resize((64, 64), Image.Resampling.BILINEAR))
    assert np.array_equal(images[0].permute(1, 2, 0).numpy(), expected)


def test_celeba_not_found_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        make_celeba(tmp_path).setup()
    message = str(info.value)
    assert "neither its image folder (img_align_celeba/) nor its partition list" in message
    assert f"is in {tmp_path / 'celeba'} or {tmp_path}. " in message
    assert "jessicali9530/celeba-dataset" in message and "Google Drive" in message


def test_celeba_missing_listed_images(tmp_path):
    image_dir = write_celeba(tmp_path, n=12)
    (image_dir / "000003.jpg").unlink()
    (image_dir / "000007.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=rf"2 of the 12 .* first is {image_dir}/000003"):
        make_celeba(tmp_path).setup()


def test_celeba_crop_larger_than_image_fails():
    with pytest.raises(ConfigError, match="crop_size=200 is invalid: must be <= 178"):
        make_celeba(Path("unused"), crop_size=200)


# --- image folder ---------------------------------------------------------------------------


def test_image_folder_labels_from_subfolders(tmp_path):
    root = write_image_folder(tmp_path / "images", n=12)
    (root / "cats" / "._img000.jpg").write_bytes(b"macOS fork, not an image")
    datamodule = make_folder(root)
    assert datamodule.image_shape == (3, 16, 16)
    datamodule.setup()
    splits = datamodule.splits
    assert datamodule.source.class_names == ["cats", "dogs"]
    # test = round(0.1 * 12) = 1, val = round(0.1 * 11) = 1
    assert {k: len(v) for k, v in splits.items()} == {"train": 10, "val": 1, "test": 1}
    paths = [p for split in datamodule.source.split_paths.values() for p in split]
    assert len(set(paths)) == 12 and any(p.suffix == ".JPEG" for p in paths)
    assert any("nested" in p.parts for p in paths)
    for name, split in splits.items():
        split_paths = datamodule.source.split_paths[name]
        for path, label in zip(split_paths, split.labels.tolist(), strict=True):
            assert label == ["cats", "dogs"].index(path.relative_to(root).parts[0])
    images, labels = next(iter(ImageDataModule(datamodule).train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8


def test_image_folder_grayscale_flat_folder(tmp_path):
    root = write_image_folder(tmp_path, n=5, classes=(), size=(30, 40))
    datamodule = make_folder(root, channels=1, image_size=8, val_size=1, test_size=1, batch_size=3)
    datamodule.setup()
    images, labels = datamodule.splits["train"][torch.arange(3)]
    assert images.shape == (3, 1, 8, 8) and labels.tolist() == [0, 0, 0]


def test_image_folder_split_is_deterministic(tmp_path):
    root = write_image_folder(tmp_path, n=20)
    first, second = make_folder(root), make_folder(root, seed=5)
    first.setup()
    second.setup()
    assert first.source.split_paths["val"] == second.source.split_paths["val"]


def test_image_folder_resizes_shorter_side_then_crops(tmp_path):
    # Left/right (wide) and top/bottom (tall) thirds are blue and get cropped away.
    wide = np.full((20, 60, 3), (0, 0, 255), dtype=np.uint8)
    wide[:, 20:40] = (200, 10, 10)
    tall = np.full((60, 20, 3), (0, 0, 255), dtype=np.uint8)
    tall[20:40] = (10, 200, 10)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(tall).save(tmp_path / "tall.png")
    datamodule = make_folder(tmp_path, image_size=16, val_size=0, test_size=0)
    datamodule.setup()
    images, _ = datamodule.splits["train"][torch.arange(2)]  # sorted: tall.png, wide.png
    assert images.shape == (2, 3, 16, 16)
    # 60x20 -> 48x16 -> central 16x16 = the middle third, up to bilinear bleed at the edges.
    assert (images[0, :, 1:-1, 1:-1] == torch.tensor([10, 200, 10]).view(3, 1, 1)).all()
    assert (images[1, :, 1:-1, 1:-1] == torch.tensor([200, 10, 10]).view(3, 1, 1)).all()


def test_image_folder_empty_and_missing(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(
        FileNotFoundError, match=rf"no images found under data.source.path={tmp_path}.*\.png"
    ):
        make_folder(tmp_path).setup()
    with pytest.raises(FileNotFoundError, match=rf"data.source.path={tmp_path / 'missing'} is not"):
        make_folder(tmp_path / "missing").setup()


def test_image_folder_rejects_two_channels():
    with pytest.raises(ConfigError, match="channels=2 is invalid: must be one of 1, 3"):
        make_folder(Path("unused"), channels=2)


def test_image_folder_with_worker_processes(tmp_path):
    root = write_image_folder(tmp_path, n=12)
    datamodule = ImageDataModule(
        make_folder(root, num_workers=2, val_size=0, test_size=0, cache=False)
    )
    assert datamodule.train_dataloader().num_workers == 2
    batches = all_batches(datamodule.train_dataloader())  # setup() runs lazily
    assert [b[0].shape for b in batches] == [(4, 3, 16, 16)] * 3


# --- configs --------------------------------------------------------------------------------


def fake_idx(name: str):
    def write(root: Path) -> dict:
        write_idx_dataset(root, n_train=64, gz=True, name=name)
        return {"data_dir": str(root)}  # the YAML's val_size, a fraction, fits any file

    return write


def fake_celeba(root: Path) -> dict:
    write_celeba(root)
    return {"data_dir": str(root), "cache_dir": str(root / "cache")}


def fake_image_folder(root: Path) -> dict:
    return {"path": str(write_image_folder(root / "images")), "cache_dir": str(root / "cache")}


# Config name -> writes fake files under a folder, returns the data.source overrides pointing at
# them.
CONFIG_FAKES = {
    "digits": lambda root: {},
    "mnist": fake_idx("MNIST"),
    "fashion_mnist": fake_idx("FashionMNIST"),
    "celeba": fake_celeba,
    "image_folder": fake_image_folder,
    "synthetic": lambda root: {"num_train": 64, "num_val": 16, "num_test": 16},
    "shapes": lambda root: {"factors": {"shape": 3, "scale": 1, "orientation": 1, "x": 8, "y": 8}},
}


@pytest.mark.parametrize("name", DATA_CONFIGS)
def test_data_config_instantiates(tmp_path, name):
    cfg = compose_config([f"data={name}", "data.num_workers=0"])
    # Each new config needs a fake in CONFIG_FAKES; in-process loading keeps the test fast.
    cfg.data.source = OmegaConf.merge(cfg.data.source, CONFIG_FAKES[name](tmp_path))
    data = targets.instantiate(cfg.data, key="data")
    assert isinstance(data, ImageData)
    image_shape = data.image_shape  # known before loading
    images, labels = next(iter(ImageDataModule(data).val_dataloader()))
    assert images.dtype == torch.uint8 and tuple(images.shape[1:]) == image_shape
    assert labels.dtype == torch.int64 and len(labels) == len(images)


def test_image_folder_config_requires_path():
    cfg = compose_config(["data=image_folder"])
    with pytest.raises(MissingMandatoryValue, match="data.source.path"):
        targets.instantiate(cfg.data, key="data")


@pytest.mark.parametrize(
    "overrides",
    [["data=celeba"], ["data=image_folder", "data.source.path=/images"], ["data=shapes"]],
)
def test_decoded_image_cache_defaults_to_the_user_cache_folder(monkeypatch, tmp_path, overrides):
    cfg = compose_config(overrides)
    monkeypatch.delenv("VAE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    # default_cache_dir(), for sources without a cache_dir (the sample-quality classifier of
    # digits), follows the same rule as the YAML's default.
    from vae_experiments.data.cache import cache_dir_of, default_cache_dir

    for env, expected in [
        ({}, "home/.cache/vae-experiments"),
        ({"XDG_CACHE_HOME": "xdg"}, "xdg/vae-experiments"),
        ({"VAE_CACHE_DIR": "mine"}, "mine"),
    ]:
        for key, value in env.items():
            monkeypatch.setenv(key, str(tmp_path / value))
        source = targets.instantiate(cfg.data).source
        assert source.cache_dir == tmp_path / expected == default_cache_dir()
        assert cache_dir_of(source) == source.cache_dir
    cfg.data.source.cache_dir = str(tmp_path / "given")
    assert targets.instantiate(cfg.data).source.cache_dir == tmp_path / "given"
    assert cache_dir_of(targets.instantiate(cfg.data).source) == tmp_path / "given"


def test_synthetic_images_are_smooth_seeded_and_shaped():
    def make(split_seed):
        data = make_data(
            Synthetic,
            dict(image_shape=[3, 20, 33], num_train=40, num_val=8, num_test=8),
            batch_size=16,
            split_seed=split_seed,
        )
        data.setup()
        return data.splits["train"].images

    images = make(0)
    assert images.shape == (40, 3, 20, 33) and images.dtype == torch.uint8
    assert torch.equal(images, make(0)) and not torch.equal(images, make(1))
    # Smooth: neighbouring pixels differ far less than independent uniform pixels (~85).
    step = (images[..., 1:].float() - images[..., :-1].float()).abs().mean()
    assert step < 20
    assert images.float().std() > 20  # but not flat


def test_synthetic_rejects_bad_shape():
    with pytest.raises(
        ConfigError,
        match=r"image_shape=\[2, 8, 8\] is invalid: must be \[channels, height, width\]",
    ):
        Synthetic(image_shape=[2, 8, 8], num_train=4, num_val=4, num_test=4)


def test_in_memory_splits_are_iterated_without_worker_processes(recwarn, monkeypatch):
    from vae_experiments.data import batches as batches_module

    workers = []
    loader = batches_module.DataLoader

    def recording_loader(*args, **kwargs):
        workers.append(kwargs["num_workers"])
        return loader(*args, **kwargs)

    monkeypatch.setattr(batches_module, "DataLoader", recording_loader)
    data = make_digits(num_workers=4)
    batches = list(iterate_split(data, "val", batch_size=100))
    assert workers == [0]
    assert [len(x) for x, _ in batches] == [100, 44]
    assert all(x.dtype == torch.float32 for x, _ in batches)
    assert not [w for w in recwarn if "worker" in str(w.message)]
    assert ImageDataModule(data).val_dataloader().num_workers == 0


def test_data_package_and_iterating_a_split_do_not_import_lightning():
    code = (
        "import sys\n"
        "from vae_experiments.data import Digits, ImageData, iterate_split\n"
        "data = ImageData(Digits(val_size=0.1, test_size=0.2), batch_size=64, num_workers=0,\n"
        "                 seed=0, split_seed=0, binarize='static', on_device='auto')\n"
        "x, y = next(iterate_split(data, 'test'))\n"
        "assert x.shape == (359, 1, 8, 8), x.shape\n"  # the whole split: one eval batch
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in\n"
        "               ('pytorch_lightning', 'lightning', 'hydra'))\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]


class _FakeStrategy:
    def __init__(self, device):
        self.root_device = torch.device(device)


@pytest.mark.parametrize("on_device", ["auto", True, False])
def test_splits_stay_on_cpu_when_training_on_cpu(on_device):
    datamodule = ImageDataModule(make_digits(on_device=on_device))
    datamodule.trainer = SimpleNamespace(strategy=_FakeStrategy("cpu"), training=True)
    images, _ = next(iter(datamodule.train_dataloader()))
    assert images.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("on_device", "expected"), [("auto", "cuda"), (True, "cuda"), (False, "cpu")]
)
def test_splits_move_to_the_gpu_once(on_device, expected):
    datamodule = ImageDataModule(make_digits(on_device=on_device))
    datamodule.trainer = SimpleNamespace(strategy=_FakeStrategy("cuda:0"), training=True)
    loader = datamodule.train_dataloader()
    images, labels = next(iter(loader))
    assert images.device.type == expected and labels.device.type == expected
    assert datamodule.train_dataloader().dataset is loader.dataset  # moved once, then reused
