"""Data the user gave is the data the model sees (issue 10): MNIST's validation split sized to
the training file, and image files decoded as they are (16-bit, alpha, tiny images)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import compose_config
from tests.fake_data import write_idx_dataset, write_image_folder
from tests.test_data import make_folder, make_idx
from vae_experiments import targets
from vae_experiments.data import MNIST, FashionMNIST

# --- MNIST / Fashion-MNIST validation split -------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_validation_split_is_sized_to_the_training_file(tmp_path, caplog, name):
    # A real subset, as a new user would try: 7,996 training images.
    cls = {"mnist": MNIST, "fashion_mnist": FashionMNIST}[name]
    write_idx_dataset(tmp_path, n_train=7996, n_test=16, name=cls.name)
    config = compose_config([f"data={name}", f"data.source.data_dir={tmp_path}"])
    data = targets.instantiate(config.data, "data")
    with caplog.at_level(logging.INFO, logger="vae_experiments.data"):
        data.setup()
    sizes = {split: len(dataset) for split, dataset in data.splits.items()}
    assert sizes["train"] + sizes["val"] == 7996
    # The default fraction carves about 5,000 of 60,000; of 7,996 that is about 666.
    assert 600 <= sizes["val"] <= 800 and sizes["train"] >= 7100
    assert f"{sizes['train']} train, {sizes['val']} val, 16 test" in caplog.text
    # On the full 60,000 images it is the 5,000 a count used to carve (the same images).
    assert round(float(config.data.source.val_size) * 60000) == 5000


def test_idx_validation_count_is_still_a_count(tmp_path):
    write_idx_dataset(tmp_path, n_train=64, n_test=16)
    data = make_idx(tmp_path, val_size=10)
    data.setup()
    assert len(data.splits["val"]) == 10 and len(data.splits["train"]) == 54


def test_idx_validation_count_leaving_less_than_a_batch_is_refused(tmp_path):
    write_idx_dataset(tmp_path, n_train=64, n_test=16)
    data = make_idx(tmp_path, val_size=60, batch_size=8)
    with pytest.raises(ValueError, match=r"data.source.val_size=60 leaves 4 training images"):
        data.setup()
    make_idx(tmp_path, val_size=56, batch_size=8).setup()  # exactly one batch is fine


# --- images decoded as they are -------------------------------------------------------------


def folder_images(root, **overrides) -> torch.Tensor:
    data = make_folder(root, val_size=0, test_size=0, **overrides)
    data.setup()
    train = data.splits["train"]
    return train[torch.arange(len(train))][0]


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_png_is_scaled_not_clipped(tmp_path, cache, channels):
    gradient = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (64, 1))
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    images = folder_images(tmp_path, image_size=64, channels=channels, cache=cache)
    expected = torch.from_numpy(np.round(gradient / 257.0).astype(np.uint8))
    assert images.shape == (1, channels, 64, 64)
    assert (images[0].int() - expected.int()).abs().max() <= 1
    assert abs(images.float().mean().item() - 127.5) < 2  # not 94% white


def save_alpha_images(root):
    half_red = Image.new("RGBA", (16, 16), (255, 0, 0, 128))
    half_red.save(root / "a_rgba.png")
    Image.new("LA", (16, 16), (0, 0)).save(root / "b_la.png")  # black, fully transparent
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 255, 255, 255])
    palette.save(root / "c_p.png", transparency=0)  # index 0 (black) transparent


@pytest.mark.parametrize("cache", [True, False])
def test_alpha_is_composited_on_the_background(tmp_path, cache):
    save_alpha_images(tmp_path)
    white = folder_images(tmp_path, cache=cache)  # default: white background
    assert white.shape == (3, 3, 16, 16)
    assert (white[0, :, 0, 0] - torch.tensor([255, 127, 127])).abs().max() <= 1
    assert (white[1] == 255).all() and (white[2] == 255).all()
    black = folder_images(tmp_path, cache=cache, alpha_background=0)
    assert (black[0, :, 0, 0] - torch.tensor([128, 0, 0])).abs().max() <= 1
    assert (black[1] == 0).all() and (black[2] == 0).all()


def test_alpha_background_is_in_the_cache_key(tmp_path):
    save_alpha_images(tmp_path)
    assert (folder_images(tmp_path)[1] == 255).all()
    assert (folder_images(tmp_path, alpha_background=0)[1] == 0).all()  # rebuilt, not reused
    assert (folder_images(tmp_path)[1] == 255).all()


def test_alpha_background_is_checked():
    with pytest.raises(ValueError, match=r"alpha_background=256 is invalid"):
        make_folder(Path("unused"), alpha_background=256)


def write_with_tiny(root):
    write_image_folder(root, n=10, size=(40, 30))
    Image.new("RGB", (1, 1), (10, 20, 30)).save(root / "cats" / "tiny1.png")
    Image.new("RGB", (12, 5), (10, 20, 30)).save(root / "dogs" / "tiny2.png")


@pytest.mark.parametrize("cache", [True, False])
def test_images_smaller_than_image_size_are_counted(tmp_path, caplog, cache):
    write_with_tiny(tmp_path)
    with caplog.at_level(logging.WARNING):
        images = folder_images(tmp_path, image_size=16, cache=cache)
    assert len(images) == 12
    warnings = [r.getMessage() for r in caplog.records if "smaller than" in r.getMessage()]
    assert len(warnings) == 1
    assert "2 of 12 images" in warnings[0] and "data.source.min_size" in warnings[0]


@pytest.mark.parametrize("cache", [True, False])
def test_min_size_leaves_small_images_out(tmp_path, caplog, cache):
    write_with_tiny(tmp_path)
    with caplog.at_level(logging.INFO):
        data = make_folder(tmp_path, val_size=0, test_size=0, cache=cache, min_size=5)
        data.setup()
    paths = data.source.split_paths["train"]
    assert len(data.splits["train"]) == 11 and len(paths) == 11
    assert not any(p.name == "tiny1.png" for p in paths)
    assert any(p.name == "tiny2.png" for p in paths)  # shorter side 5 is not below 5
    assert "left out 1 of 12 images" in caplog.text


def test_min_size_is_in_the_cache_key(tmp_path):
    write_with_tiny(tmp_path)
    assert len(folder_images(tmp_path)) == 12
    assert len(folder_images(tmp_path, min_size=16)) == 10
    assert len(folder_images(tmp_path)) == 12


@pytest.mark.parametrize("name", ["image_folder", "celeba"])
def test_configs_document_the_new_options(name):
    config = compose_config([f"data={name}"])
    assert config.data.source.alpha_background == 255
    assert config.data.source.min_size == 0
