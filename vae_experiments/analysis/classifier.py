"""A small conv classifier per dataset, whose features the sample-quality numbers are measured in.

The Fréchet distance and precision/recall of :mod:`vae_experiments.analysis.quality` need a
feature space that knows what the images of a dataset look like. Papers use Inception-v3's
(ImageNet) features; offline, and for 8x8 digits or 28x28 Fashion-MNIST, a classifier trained
on the dataset's own training split does the job: :class:`FeatureClassifier`, trained once per
dataset by :func:`load_or_train_classifier` with a fixed recipe (:data:`RECIPE`) from a fixed
seed, and cached beside the data caches (:func:`vae_experiments.data.cache.cache_dir_of`) as
``classifier-<dataset>-<C>x<H>x<W>-<key>.pt``. The key hashes the recipe and the training
images and labels themselves, so every run of a dataset (whatever its config spells) shares one
classifier and its numbers are comparable, and changed data gets a new one. The file holds the
weights and its test accuracy, and loads with ``weights_only=True``.

Plain PyTorch::

    trained = load_or_train_classifier(train_x, train_y, test_x, test_y, cache_dir, "digits")
    features = trained.model.features(to_float(test_x))  # (N, RECIPE["features"])
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vae_experiments.data.batches import to_float
from vae_experiments.runs.files import atomic_write

log = logging.getLogger(__name__)

#: How every classifier is trained; part of the cache key (a change trains new ones). Adam on
#: the cross-entropy, ``epochs`` passes over the training split but at least ``min_steps``
#: steps (the 1,294 training digits make 10 batches an epoch): seconds for digits, minutes for
#: Fashion-MNIST on a CPU.
RECIPE: dict[str, Any] = {
    "version": 1,
    "seed": 0,
    "channels": [32, 64],
    "features": 128,
    "epochs": 3,
    "min_steps": 300,
    "batch_size": 128,
    "lr": 1e-3,
}
#: Images per forward pass when computing features or accuracy.
EVAL_BATCH = 1000


class CorruptClassifierError(ValueError):
    """A cached classifier file that does not load; the message names it and the fix."""


class UnlabelledDataError(ValueError):
    """Training images that all have one label: nothing to train a classifier on."""


class FeatureClassifier(nn.Module):
    """Two conv blocks (a 3x3 conv, ReLU and a 2x2 max-pool each), a 4x4 adaptive average pool and
    a fully connected layer of ``features`` units: the features; a linear layer to the classes.

    Args:
        image_shape: (C, H, W) of the images, at least 4x4.
        num_classes: labels 0 .. num_classes - 1.
        channels: output channels of the two conv blocks.
        features: size of the feature layer (the space the quality numbers are measured in).
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        features: int = 128,
    ):
        super().__init__()
        in_channels = int(image_shape[0])
        layers: list[nn.Module] = []
        for out_channels in channels:
            layers += [
                nn.Conv2d(in_channels, out_channels, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            in_channels = out_channels
        # 8x8 digits leave 2x2 (repeated to 4x4), 28x28 images 7x7, 64x64 faces 16x16.
        layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.feature_layer = nn.Sequential(nn.Linear(in_channels * 16, features), nn.ReLU())
        self.head = nn.Linear(features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] -> features (B, features)."""
        return self.feature_layer(self.body(x))

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) in [0, 1] -> class logits (B, num_classes)."""
        return self.head(self.features(x))


@dataclass
class TrainedClassifier:
    """A dataset's classifier, as :func:`load_or_train_classifier` returns it.

    Attributes:
        model: in eval mode, on the device asked for.
        test_accuracy: share of the test split it classifies correctly.
        path: its cache file.
        trained: whether this call trained it (False: loaded from ``path``).
        info: what the file records besides the weights (recipe, accuracy, seconds, ...).
    """

    model: FeatureClassifier
    test_accuracy: float
    path: Path
    trained: bool
    info: dict[str, Any]


def classifier_file(cache_dir: str | Path, name: str, images: Tensor, labels: Tensor) -> Path:
    """``<cache_dir>/classifier-<name>-<C>x<H>x<W>-<key>.pt`` for these training images.

    Args:
        name: readable prefix, the dataset (``digits``, ``fashionmnist``).
        images: uint8 training images (N, C, H, W).
        labels: int64 labels (N,).
    """
    digest = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode())
    digest.update(str(tuple(images.shape)).encode())
    digest.update(np.ascontiguousarray(images.cpu().numpy()).tobytes())
    digest.update(np.ascontiguousarray(labels.cpu().numpy().astype(np.int64)).tobytes())
    shape = "x".join(str(s) for s in images.shape[1:])
    return Path(cache_dir) / f"classifier-{name}-{shape}-{digest.hexdigest()[:16]}.pt"


def _check_data(images: Tensor, labels: Tensor, what: str) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"{what} images must be uint8 (N, C, H, W), got {images.dtype}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{what} labels must have shape ({images.shape[0]},)")


def num_classes_of(labels: Tensor) -> int:
    """Classes of the labels 0 .. max; raises :class:`UnlabelledDataError` when there is only
    one (unlabelled data: synthetic images, CelebA, a folder without subfolders)."""
    if labels.numel() == 0 or int(labels.min()) < 0:
        raise ValueError("labels must be integers >= 0")
    if len(torch.unique(labels)) < 2:
        raise UnlabelledDataError(
            f"the training split has a single label ({int(labels[0])}): a classifier needs "
            "labelled data (digits, MNIST, Fashion-MNIST, an image folder with class subfolders)"
        )
    return int(labels.max()) + 1


@torch.no_grad()
def accuracy(model: FeatureClassifier, images: Tensor, labels: Tensor) -> float:
    """Share of uint8 images (N, C, H, W) whose predicted class is their label."""
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(images), EVAL_BATCH):
        x = to_float(images[start : start + EVAL_BATCH].to(device))
        predicted = model(x).argmax(1).cpu()
        correct += int((predicted == labels[start : start + EVAL_BATCH].cpu()).sum())
    return correct / max(1, len(images))


def train_classifier(
    images: Tensor, labels: Tensor, device: str | torch.device = "cpu"
) -> FeatureClassifier:
    """Trains a :class:`FeatureClassifier` with :data:`RECIPE` on uint8 images (N, C, H, W) and
    labels (N,); the same weights for the same data on the same device (its own generator
    draws the initial weights and the batches; the global RNG is left alone)."""
    _check_data(images, labels, "training")
    num_classes = num_classes_of(labels)
    generator = torch.Generator().manual_seed(RECIPE["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RECIPE["seed"])  # nn.Module initialisers draw from the global RNG
        model = FeatureClassifier(
            images.shape[1:], num_classes, RECIPE["channels"], RECIPE["features"]
        )
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=RECIPE["lr"])
    batch = min(RECIPE["batch_size"], len(images))
    per_epoch = len(images) // batch
    steps = max(RECIPE["epochs"] * per_epoch, RECIPE["min_steps"])
    images_on_device = images.to(device)
    labels_on_device = labels.to(device)
    step = 0
    while step < steps:
        order = torch.randperm(len(images), generator=generator).to(device)
        for i in range(per_epoch):
            if step >= steps:
                break
            index = order[i * batch : (i + 1) * batch]
            x = to_float(images_on_device.index_select(0, index))
            loss = nn.functional.cross_entropy(model(x), labels_on_device.index_select(0, index))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return model.eval()


def _load(path: Path, device: str | torch.device) -> tuple[FeatureClassifier, dict[str, Any]]:
    """The classifier in ``path`` and its info; :class:`CorruptClassifierError` if it does not
    load as one."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        info = dict(saved["info"])
        model = FeatureClassifier(
            info["image_shape"], info["num_classes"], RECIPE["channels"], RECIPE["features"]
        )
        model.load_state_dict(saved["state_dict"])
        accuracy_ = float(info["test_accuracy"])
        if info["recipe"] != RECIPE or not 0 <= accuracy_ <= 1:
            raise ValueError("its recipe or accuracy is not this version's")
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CorruptClassifierError(
            f"the cached sample-quality classifier {path} cannot be read ({reason}); delete it, "
            "and the next evaluation trains a new one"
        ) from None
    return model.to(device).eval(), info


def load_or_train_classifier(
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    cache_dir: str | Path,
    name: str,
    device: str | torch.device = "cpu",
) -> TrainedClassifier:
    """The dataset's cached classifier, or a new one trained, tested and cached.

    Args:
        train_images, train_labels: the training split, uint8 (N, C, H, W) and int64 (N,):
            what the classifier is trained on, and (with :data:`RECIPE`) its cache key.
        test_images, test_labels: the test split, for the accuracy stored with it.
        cache_dir: the folder of the dataset's caches (created if missing).
        name: the dataset's name in the file name.
        device: where it trains and where the returned model lives.

    Raises:
        CorruptClassifierError: the cache file exists but does not load (names it).
        UnlabelledDataError: the training split has a single label, or its labels are
            factors (N, F) rather than classes.
    """
    if train_labels.ndim == 2:
        raise UnlabelledDataError(
            f"the labels are {train_labels.shape[1]} factors per image (data with known "
            "factors, e.g. data=shapes), not classes: a classifier needs class-labelled data "
            "(digits, MNIST, Fashion-MNIST, an image folder with class subfolders)"
        )
    _check_data(train_images, train_labels, "training")
    _check_data(test_images, test_labels, "test")
    path = classifier_file(cache_dir, name, train_images, train_labels)
    if path.exists():
        model, info = _load(path, device)
        log.info("using the %s classifier in %s", name, path)
        return TrainedClassifier(model, float(info["test_accuracy"]), path, False, info)

    num_classes_of(train_labels)  # before any time is spent
    start = time.perf_counter()
    log.info(
        "training the %s classifier for the sample-quality features on %d images (once; "
        "cached in %s)",
        name,
        len(train_images),
        path,
    )
    model = train_classifier(train_images, train_labels, device)
    seconds = time.perf_counter() - start
    test_accuracy = accuracy(model, test_images, test_labels)
    info = {
        "recipe": RECIPE,
        "dataset": name,
        "image_shape": [int(s) for s in train_images.shape[1:]],
        "num_classes": model.head.out_features,
        "num_train": len(train_images),
        "num_test": len(test_images),
        "test_accuracy": test_accuracy,
        "train_accuracy": accuracy(model, train_images, train_labels),
        "seconds": round(seconds, 1),
        "device": str(device),
    }
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    with atomic_write(path, "wb") as file:  # never a half-written file under the cache's name
        torch.save({"state_dict": state, "info": info}, file)
    log.info(
        "trained the %s classifier in %.1f s: test accuracy %.4f; saved %s",
        name,
        seconds,
        test_accuracy,
        path,
    )
    return TrainedClassifier(model, test_accuracy, path, True, info)
