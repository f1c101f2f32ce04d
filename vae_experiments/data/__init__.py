"""Image data in plain torch: sources yielding uint8 splits, :class:`ImageData` batching them.

The Lightning side, :class:`~vae_experiments.data.datamodule.ImageDataModule`, is imported from
``vae_experiments.data.datamodule`` (not here, so that loading data needs no Lightning).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# No torch: the command line's config checks name DataError among the mistakes they report.
from vae_experiments.data.errors import DataError, DataNotFoundError
from vae_experiments.lazy_names import lazy_getattr

if TYPE_CHECKING:
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
    from vae_experiments.data.file_source import FileSource
    from vae_experiments.data.files import ImageFiles
    from vae_experiments.data.idx import MNIST, FashionMNIST, IdxImages, read_idx
    from vae_experiments.data.image_folder import ImageFolder
    from vae_experiments.data.images import ImageData
    from vae_experiments.data.shapes import Shapes
    from vae_experiments.data.source import ImageSource
    from vae_experiments.data.synthetic import Synthetic

#: Names that import torch when first used (so that ``vae_experiments.data.errors`` does not):
#: name -> its module.
_NEEDS_TORCH = {
    "BatchGroup": "vae_experiments.data.batches",
    "ShuffledBatchSampler": "vae_experiments.data.batches",
    "TensorImages": "vae_experiments.data.batches",
    "iterate_split": "vae_experiments.data.batches",
    "load_split": "vae_experiments.data.batches",
    "to_float": "vae_experiments.data.batches",
    "CelebA": "vae_experiments.data.celeba",
    "Digits": "vae_experiments.data.digits",
    "FileSource": "vae_experiments.data.file_source",
    "ImageFiles": "vae_experiments.data.files",
    "MNIST": "vae_experiments.data.idx",
    "FashionMNIST": "vae_experiments.data.idx",
    "IdxImages": "vae_experiments.data.idx",
    "read_idx": "vae_experiments.data.idx",
    "ImageFolder": "vae_experiments.data.image_folder",
    "ImageData": "vae_experiments.data.images",
    "ImageSource": "vae_experiments.data.source",
    "Shapes": "vae_experiments.data.shapes",
    "Synthetic": "vae_experiments.data.synthetic",
}

__getattr__ = lazy_getattr(__name__, _NEEDS_TORCH)


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
    "Shapes",
    "Synthetic",
    "TensorImages",
    "iterate_split",
    "load_split",
    "to_float",
    "read_idx",
]
