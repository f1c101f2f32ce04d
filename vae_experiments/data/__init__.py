"""Image data in plain torch: sources yielding uint8 splits, :class:`ImageData` batching them.

The Lightning side, :class:`~vae_experiments.data.datamodule.ImageDataModule`, is imported from
``vae_experiments.data.datamodule`` (not here, so that loading data needs no Lightning).
"""

from __future__ import annotations

from vae_experiments.data.batches import (
    BatchGroup,
    ShuffledBatchSampler,
    TensorImages,
    iterate_split,
    load_split,
    to_float,
)
from vae_experiments.data.celeba import CelebA
from vae_experiments.data.digits import Digits
from vae_experiments.data.errors import DataError, DataNotFoundError
from vae_experiments.data.file_source import FileSource
from vae_experiments.data.files import ImageFiles
from vae_experiments.data.idx import MNIST, FashionMNIST, IdxImages, read_idx
from vae_experiments.data.image_folder import ImageFolder
from vae_experiments.data.images import ImageData
from vae_experiments.data.source import ImageSource
from vae_experiments.data.synthetic import Synthetic

__all__ = [
    "MNIST",
    "CelebA",
    "DataError",
    "DataNotFoundError",
    "Digits",
    "FashionMNIST",
    "FileSource",
    "IdxImages",
    "ImageData",
    "ImageFiles",
    "ImageFolder",
    "ImageSource",
    "BatchGroup",
    "ShuffledBatchSampler",
    "Synthetic",
    "TensorImages",
    "iterate_split",
    "load_split",
    "to_float",
    "read_idx",
]
