"""The data of a run: a source plus how it is batched. What the ``data:`` config builds."""

from __future__ import annotations

import logging

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vae_experiments.data.batches import SPLIT_NAMES, TensorImages, binarize_uint8, to_float
from vae_experiments.data.checks import at_least, one_of
from vae_experiments.data.source import ImageSource
from vae_experiments.models.likelihoods import BINARY, EIGHT_BIT
from vae_experiments.targets import ConfigError

log = logging.getLogger(__name__)

BINARIZE_CHOICES = ("none", "static", "dynamic")
ON_DEVICE_CHOICES = ("auto", True, False)


def pixel_kind(binarize: str) -> str:
    """What pixels data with this ``binarize`` setting hold: ``"binary"`` (0 or 1) when
    binarised, else ``"8-bit"`` (k / 255: every source yields uint8 images)."""
    return EIGHT_BIT if binarize == "none" else BINARY


#: ``eval_batch_size=auto``'s smallest batch: the Burda preset's validation of 5,000
#: Fashion-MNIST images took 0.83 s of arithmetic at 500 against 1.43 s at batch 20 here (one
#: thread), before Lightning's ~3 ms per batch (0.75 s more at 20); larger batches gained little.
AUTO_EVAL_BATCH_SIZE = 500


class ImageData:
    """A source's splits, loaded once, with the settings that turn them into batches.

    Plain torch: iterate a split with :func:`~vae_experiments.data.batches.iterate_split`, or
    train on it through :class:`~vae_experiments.data.datamodule.ImageDataModule`.

    Args:
        source: Where the images come from, e.g. :class:`~vae_experiments.data.Digits`.
        batch_size: Images per training batch, per process.
        eval_batch_size: Images per validation and test batch, per process, or "auto": the
            larger of ``batch_size`` and :data:`AUTO_EVAL_BATCH_SIZE`. Evaluation keeps no
            graph, so its batches can be larger, and every batch costs Lightning's fixed
            per-batch work: a validation of 5,000 images at batch 20 is 250 of them.
        num_workers: DataLoader worker processes for splits decoded per batch (in-memory splits
            are served from the main process), and threads decoding or checking files.
        seed: Run seed; drives the training shuffle.
        split_seed: Fixed seed for carving val/test and for static binarisation, so splits stay
            the same when the run seed changes.
        binarize: "none", "static" (every split binarised once at setup) or "dynamic" (val/test
            binarised once, training batches resampled on the device every step).
        on_device: Keep in-memory splits on the accelerator, so a batch is one gather there and
            nothing crosses the bus per step: true, false, or "auto" (when training runs on a
            GPU and all splits take at most a quarter of its free memory). Ignored on the CPU.
    """

    def __init__(
        self,
        source: ImageSource,
        batch_size: int,
        num_workers: int,
        seed: int,
        split_seed: int,
        binarize: str,
        on_device: str | bool,
        eval_batch_size: int | str = "auto",
    ) -> None:
        if not isinstance(source, ImageSource):
            raise ConfigError(
                "source",
                allowed=f"must be a data source (a _target_ under vae_experiments.data), "
                f"got {type(source).__name__}",
            )
        self.source = source
        self.batch_size = at_least("batch_size", batch_size, 1)
        if eval_batch_size == "auto":
            eval_batch_size = max(self.batch_size, AUTO_EVAL_BATCH_SIZE)
        elif isinstance(eval_batch_size, str) or isinstance(eval_batch_size, bool):
            raise ConfigError(
                "eval_batch_size", eval_batch_size, "must be an integer >= 1 or auto"
            )
        self.eval_batch_size = at_least("eval_batch_size", eval_batch_size, 1)
        self.num_workers = at_least("num_workers", num_workers, 0)
        self.seed = seed
        self.split_seed = split_seed
        self.binarize = one_of("binarize", binarize, BINARIZE_CHOICES)
        self.on_device = one_of("on_device", on_device, ON_DEVICE_CHOICES)
        self.splits: dict[str, Dataset] | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image, known without touching the disk."""
        return self.source.image_shape

    @property
    def class_names(self) -> list[str] | None:
        """The classes the labels index, or None for data without classes (see
        :attr:`ImageSource.class_names <vae_experiments.data.source.ImageSource.class_names>`)."""
        return self.source.class_names

    @property
    def factor_names(self) -> tuple[str, ...] | None:
        """The factors the label columns index, for data with known factors (labels (N, F));
        None for class-labelled or unlabelled data (labels (N,)). See
        :attr:`ImageSource.factor_names <vae_experiments.data.source.ImageSource.factor_names>`."""
        return self.source.factor_names

    @property
    def factor_sizes(self) -> tuple[int, ...] | None:
        """How many values each factor of :attr:`factor_names` takes; None without factors."""
        return self.source.factor_sizes

    @property
    def num_classes(self) -> int | None:
        """How many classes the labels index; None for data without classes."""
        names = self.class_names
        return None if names is None else len(names)

    @property
    def pixel_kind(self) -> str:
        """``"binary"`` or ``"8-bit"``: see :func:`pixel_kind`."""
        return pixel_kind(self.binarize)

    @property
    def name(self) -> str:
        """The source's class name, for messages (``Digits``)."""
        return type(self.source).__name__

    @property
    def threads(self) -> int:
        """Threads decoding or checking files."""
        return max(1, self.num_workers)

    def prepare(self) -> None:
        """Download or decode what :meth:`setup` reads; once per machine (local rank 0)."""
        self.source.prepare(self.split_seed, self.threads)

    def setup(self) -> None:
        """Load (and, unless ``binarize="none"``, binarise) the splits once; later calls are
        no-ops."""
        if self.splits is not None:
            return
        splits = self.source.load(self.split_seed, self.threads)
        if sorted(splits) != sorted(SPLIT_NAMES):
            raise RuntimeError(f"load() must return {SPLIT_NAMES}, got {sorted(splits)}")
        for name, dataset in splits.items():
            if isinstance(dataset, TensorImages) and dataset.images.shape[1:] != self.image_shape:
                raise RuntimeError(
                    f"{name} images have shape {tuple(dataset.images.shape[1:])}, but "
                    f"image_shape is {self.image_shape}"
                )
        self._check_training_batch(len(splits["train"]))
        self._check_labels(splits)
        if self.binarize != "none":
            splits = self._binarize_splits(splits)
        self.splits = splits
        # INFO, so train.log says what the model sees (a subset file shrinks every split).
        log.info(
            "%s: %s images of shape %s",
            self.name,
            ", ".join(f"{len(splits[name])} {name}" for name in SPLIT_NAMES),
            self.image_shape,
        )

    def _check_training_batch(self, num_train: int) -> None:
        """Refuse split counts that leave fewer training images than one batch.

        Only counts (ints) are refused: a fraction scales with the data, and a training split
        smaller than a batch otherwise trains full-batch (see ``ShuffledBatchSampler``).
        """
        counts = {
            key: size
            for key, size in self.source.carved_sizes().items()
            if isinstance(size, int) and size > 0
        }
        if not counts or num_train >= self.batch_size:
            return
        given = ", ".join(f"data.source.{key}={size}" for key, size in counts.items())
        keys = " or ".join(f"data.source.{key}" for key in counts)
        raise ConfigError(
            allowed=f"{given} leaves {num_train} training images, fewer than one batch "
            f"(data.batch_size={self.batch_size}); lower {keys} (a float is a fraction of the "
            "images) or data.batch_size"
        )

    def _check_labels(self, splits: dict[str, Dataset]) -> None:
        """Refuse labels outside the source's classes (a conditional model indexes its
        class vectors with them, unchecked on the hot path), or factor labels that are not
        (N, F) indices within the factors' sizes."""
        if self.factor_sizes is not None:
            self._check_factor_labels(splits)
            return
        count = self.num_classes
        if count is None:
            return
        for name, dataset in splits.items():
            labels = getattr(dataset, "labels", None)
            if labels is None or len(labels) == 0:
                continue
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= count:
                raise ValueError(
                    f"{self.name}'s {name} labels run from {low} to {high}, but it has {count} "
                    f"classes (labels 0 to {count - 1}): are the label files those of the images?"
                )

    def _check_factor_labels(self, splits: dict[str, Dataset]) -> None:
        sizes = torch.tensor(self.factor_sizes)
        for name, dataset in splits.items():
            labels = getattr(dataset, "labels", None)
            if labels is None:
                continue
            if labels.ndim != 2 or labels.shape[1] != len(sizes):
                raise ValueError(
                    f"{self.name}'s {name} labels have shape {tuple(labels.shape)}, not "
                    f"(N, {len(sizes)}): one index per factor ({', '.join(self.factor_names)})"
                )
            if len(labels) and (bool((labels < 0).any()) or bool((labels >= sizes).any())):
                raise ValueError(
                    f"{self.name}'s {name} labels fall outside the factors' sizes "
                    f"{tuple(self.factor_sizes)}"
                )

    def _binarize_splits(self, splits: dict[str, Dataset]) -> dict[str, Dataset]:
        generator = torch.Generator().manual_seed(self.split_seed)
        binarized = dict(splits)
        # val and test first, so they come out identical under "static" and "dynamic".
        for name in ("val", "test", "train"):
            if name == "train" and self.binarize == "dynamic":
                continue
            dataset = splits[name]
            if not isinstance(dataset, TensorImages):
                raise TypeError(
                    f"data.binarize={self.binarize} needs in-memory splits, got "
                    f"{type(dataset).__name__} (set data.source.cache=true)"
                )
            binarized[name] = TensorImages(
                binarize_uint8(dataset.images, generator), dataset.labels
            )
        return binarized

    def to_float(self, images: Tensor) -> Tensor:
        """uint8 images (B, C, H, W) as float32 in [0, 1], on their device."""
        return to_float(images)
