"""Data sources as LightningDataModules yielding uint8 batches, converted to floats on the device."""

from __future__ import annotations

from vae_experiments.data.base import ImageDataModule, ShuffledBatchSampler, TensorImages
from vae_experiments.data.celeba import CelebADataModule
from vae_experiments.data.digits import DigitsDataModule
from vae_experiments.data.files import ImageFiles
from vae_experiments.data.idx import FashionMNISTDataModule, MNISTDataModule, read_idx
from vae_experiments.data.image_folder import ImageFolderDataModule
from vae_experiments.data.synthetic import SyntheticDataModule

__all__ = [
    "CelebADataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageFiles",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "ShuffledBatchSampler",
    "SyntheticDataModule",
    "TensorImages",
    "read_idx",
]
