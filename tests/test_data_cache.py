"""The decoded-image cache of CelebA and image folders: built once, reused, rebuilt when the
images change, equal to per-file decoding, and never left half-written."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.conftest import compose_config
from tests.fake_data import photo_crops, write_celeba, write_image_folder
from tests.test_data import make_celeba, make_folder
from vae_experiments import targets
from vae_experiments.data import TensorImages, cache
from vae_experiments.data.cache import cache_file, ensure_cache
from vae_experiments.data.datamodule import ImageDataModule
from vae_experiments.data.files import CenterCropResize, ImageFiles
from vae_experiments.targets import ConfigError

SPLITS = ("train", "val", "test")


@pytest.fixture
def builds(monkeypatch) -> list[Path]:
    """Records the ``.npy`` path of every cache build."""
    calls: list[Path] = []
    build = cache.build_cache

    def counting_build(files, npy, *args, **kwargs):
        calls.append(npy)
        return build(files, npy, *args, **kwargs)

    monkeypatch.setattr(cache, "build_cache", counting_build)
    return calls


def all_images(datamodule) -> dict[str, torch.Tensor]:
    """Every split's images (N, C, H, W), read through the split's dataset."""
    return {
        name: dataset[torch.arange(len(dataset))][0] for name, dataset in datamodule.splits.items()
    }


def cache_files(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir() if not p.name.endswith(".lock"))


def test_celeba_cache_is_built_once_and_equals_per_file_decoding(tmp_path, builds):
    write_celeba(tmp_path, n=12)
    datamodule = make_celeba(tmp_path)
    ImageDataModule(datamodule).prepare_data()
    assert len(builds) == 3
    files = cache_files(tmp_path / "cache")
    assert len(files) == 6 and all(f.startswith("celeba-") for f in files)
    assert {Path(f).suffix for f in files} == {".npy", ".json"}
    datamodule.setup()
    assert len(builds) == 3  # setup maps what prepare_data built
    assert all(isinstance(split, TensorImages) for split in datamodule.splits.values())
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: the arrays are memory-mapped files, not copies in memory
        mapped = maps.read_text()
        assert all(str(npy) in mapped for npy in builds)
    uncached = make_celeba(tmp_path, cache=False)
    uncached.setup()
    cached_images, expected = all_images(datamodule), all_images(uncached)
    for name in SPLITS:
        assert cached_images[name].shape == (len(expected[name]), 3, 64, 64)
        assert torch.equal(cached_images[name], expected[name])  # pixel for pixel

    again = make_celeba(tmp_path)
    again.setup()  # no prepare_data: setup finds the cache itself
    assert len(builds) == 3
    reused = all_images(again)
    assert all(torch.equal(reused[name], cached_images[name]) for name in SPLITS)


def test_image_folder_cache_equals_per_file_decoding(tmp_path, builds):
    root = write_image_folder(tmp_path / "images", n=20)
    cached = make_folder(root, channels=1, cache_dir=str(tmp_path / "cache"), num_workers=2)
    cached.setup()
    uncached = make_folder(root, channels=1, cache=False)
    uncached.setup()
    assert len(builds) == 3
    assert cached.source.split_paths == uncached.source.split_paths
    for name in SPLITS:
        assert torch.equal(cached.splits[name].labels, uncached.splits[name].labels)
    assert all(
        torch.equal(a, b)
        for a, b in zip(all_images(cached).values(), all_images(uncached).values(), strict=True)
    )
    # Served in memory: no worker processes, whatever num_workers says.
    assert ImageDataModule(cached).train_dataloader().num_workers == 0


def test_touched_or_replaced_image_rebuilds_its_split_only(tmp_path, builds):
    image_dir = write_celeba(tmp_path, n=12)
    datamodule = make_celeba(tmp_path)
    datamodule.setup()
    assert len(builds) == 3
    train_npy = builds[0]
    first = train_npy.stat().st_mtime_ns

    make_celeba(tmp_path).setup()
    assert len(builds) == 3 and train_npy.stat().st_mtime_ns == first

    stat = (image_dir / "000001.jpg").stat()  # a train image
    os.utime(image_dir / "000001.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    make_celeba(tmp_path).setup()
    assert builds[3:] == [train_npy]

    photo_crops(13, (178, 218))[12].save(image_dir / "000011.jpg", quality=90)  # a test image
    replaced = make_celeba(tmp_path)
    replaced.setup()
    assert len(builds) == 5 and builds[4].name.startswith("celeba-test-")
    uncached = make_celeba(tmp_path, cache=False)
    uncached.setup()
    assert torch.equal(all_images(replaced)["test"], all_images(uncached)["test"])
    assert not torch.equal(all_images(replaced)["test"], all_images(datamodule)["test"])


def test_other_size_or_crop_gets_its_own_cache(tmp_path, builds):
    write_celeba(tmp_path, n=6)
    make_celeba(tmp_path).setup()
    make_celeba(tmp_path, image_size=32).setup()
    make_celeba(tmp_path, crop_size=100).setup()
    make_celeba(tmp_path, image_size=32).setup()
    assert len(builds) == 9 and len(set(builds)) == 9
    names = [p.name for p in builds]
    assert any("-crop148-32px-" in n for n in names) and any("-crop100-64px-" in n for n in names)


@pytest.mark.parametrize("threads", [1, 2], ids=["main_thread", "threads"])
def test_interrupted_build_leaves_no_valid_looking_cache(tmp_path, builds, monkeypatch, threads):
    write_celeba(tmp_path, n=12)
    decode = ImageFiles.decode
    calls = []

    def interrupted_decode(self, index):
        calls.append(index)
        if len(calls) == 5:
            raise KeyboardInterrupt  # Ctrl-C, or any error, in the middle of the build
        return decode(self, index)

    monkeypatch.setattr(ImageFiles, "decode", interrupted_decode)
    with pytest.raises(KeyboardInterrupt):
        make_celeba(tmp_path, num_workers=threads).setup()
    assert cache_files(tmp_path / "cache") == []  # no array, no JSON, no temporary file

    monkeypatch.setattr(ImageFiles, "decode", decode)
    datamodule = make_celeba(tmp_path)
    datamodule.setup()
    assert len(datamodule.splits["train"]) == 8


def test_killed_build_leftovers_are_ignored_and_cleaned(tmp_path, builds):
    write_celeba(tmp_path, n=6)
    datamodule = make_celeba(tmp_path)
    files = datamodule.source.file_splits(datamodule.split_seed)["train"]
    npy = cache_file(tmp_path / "cache", datamodule.source.cache_name("train"), files, 0)
    npy.parent.mkdir()
    # A process killed mid-build: a half-written temporary file, and an array without its JSON.
    stale = npy.with_name(npy.name + ".tmp999999")
    stale.write_bytes(b"\x93NUMPY half")
    np.save(npy, np.zeros((len(files), 3, 64, 64), dtype=np.uint8))
    datamodule.setup()
    assert builds[0] == npy and not stale.exists()
    assert datamodule.splits["train"].images.float().mean() > 0  # real pixels, not the zeros


def test_corrupt_json_or_mismatched_array_rebuilds(tmp_path, builds):
    write_celeba(tmp_path, n=6)
    make_celeba(tmp_path).setup()
    npy = builds[0]
    npy.with_suffix(".json").write_text("{not json")
    make_celeba(tmp_path).setup()
    assert builds[3:] == [npy]
    np.save(npy, np.zeros((1, 3, 64, 64), dtype=np.uint8))  # wrong length for its JSON
    make_celeba(tmp_path).setup()
    assert builds[4:] == [npy]


def test_concurrent_builders_build_once(tmp_path, builds):
    image_dir = write_celeba(tmp_path, n=24)
    files = ImageFiles(sorted(image_dir.iterdir()), [0] * 24, CenterCropResize(148, 16), 3, 255)
    npy = cache_file(tmp_path / "cache", "concurrent", files, 0)
    results, errors = [], []

    def build():
        try:
            results.append(ensure_cache(files, npy, (3, 16, 16), False, threads=1, min_size=0))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=build) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == [] and len(results) == 3
    assert builds == [npy]  # the others waited on the lock, then used it
    assert all(torch.equal(r.images, results[0].images) for r in results)


def test_unwritable_cache_dir_says_what_to_set(tmp_path):
    write_celeba(tmp_path, n=6)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(PermissionError) as info:
        make_celeba(tmp_path, cache_dir=str(tmp_path / "file" / "cache")).setup()
    message = str(info.value)
    assert str(tmp_path / "file" / "cache") in message
    assert "data.source.cache_dir" in message and "data.source.cache=false" in message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data=celeba", "data.source.cache=yes"],
            "data.source.cache=yes is invalid: must be true",
        ),
        (
            ["data=image_folder", "data.source.path=/x", "data.source.cache_dir=null"],
            "data.source.cache_dir=null is invalid: must be a path",
        ),
        (
            ["data=image_folder", "data.source.path=/x", "data.source.skip_corrupt=1"],
            "data.source.skip_corrupt=1 is invalid: must be true or false",
        ),
    ],
)
def test_bad_cache_keys_fail_in_init(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        targets.instantiate(compose_config(overrides).data, key="data")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cached_splits_move_to_the_gpu(tmp_path):
    write_celeba(tmp_path, n=12)
    datamodule = ImageDataModule(make_celeba(tmp_path, num_workers=2))
    strategy = SimpleNamespace(root_device=torch.device("cuda:0"))
    datamodule.trainer = SimpleNamespace(strategy=strategy, training=True)
    loader = datamodule.train_dataloader()
    images, labels = next(iter(loader))
    assert images.device.type == "cuda" and labels.device.type == "cuda"
    assert loader.num_workers == 0
    per_file = make_celeba(tmp_path, cache=False)
    per_file.setup()
    on_gpu = loader.dataset.images.cpu()
    assert torch.equal(on_gpu, per_file.splits["train"][torch.arange(len(on_gpu))][0])
