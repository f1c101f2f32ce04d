"""Shared pieces of every data source.

Batches stay uint8 (B, C, H, W) until they reach the device: the DataLoader moves a quarter of
the bytes of float32, and :meth:`ImageDataModule.on_after_batch_transfer` converts them there.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from vae_experiments.data.checks import check_choice, check_int
from vae_experiments.data.splits import binarize_uint8

log = logging.getLogger(__name__)

BINARIZE_CHOICES = ("none", "static", "dynamic")
#: ``on_device="auto"`` keeps the splits on the GPU when they take at most this share of its free
#: memory; the rest is left for the model, activations and the optimizer.
ON_DEVICE_MAX_FREE_FRACTION = 0.25
SPLIT_NAMES = ("train", "val", "test")


class TensorImages(Dataset):
    """In-memory images, indexed a whole batch at a time with one tensor gather.

    Args:
        images: uint8 images (N, C, H, W), values 0..255.
        labels: int64 labels (N,).
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} "
                f"of shape {tuple(images.shape)}"
            )
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Return uint8 images (B, C, H, W) and int64 labels (B,) for 1-D ``indices`` (B,)."""
        # index_select, not images[indices]: advanced indexing of a uint8 (N, C, H, W) tensor is
        # ~40x slower on a CPU (1.4 ms vs 0.03 ms for 128 Fashion-MNIST images).
        return self.images.index_select(0, indices), self.labels.index_select(0, indices)


class ShuffledBatchSampler(Sampler[Tensor]):
    """Yields one 1-D int64 index tensor per batch, sharded across DDP processes.

    The shuffle depends only on ``seed + epoch``, so every rank draws the same permutation and
    takes a disjoint stride of it. With ``drop_last`` every rank gets the same number of full
    batches (unequal counts make DDP hang); without it (evaluation) shards may differ by one
    image and the last batch may be partial.

    Args:
        num_items: Number of images in the split.
        batch_size: Images per batch.
        shuffle: Draw a fresh permutation each epoch (see :meth:`set_epoch`).
        drop_last: Drop the partial batch and trim the split to a multiple of the world size.
        seed: Run seed; the permutation of epoch ``e`` is seeded with ``seed + e``.
        rank: This process's rank; ``None`` asks ``torch.distributed`` when iterating.
        world_size: Number of processes; ``None`` asks ``torch.distributed`` when iterating.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if num_items < 0:
            raise ValueError(f"num_items must be >= 0, got {num_items}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        # Resolved lazily: the DataLoader may be built before the process group exists.
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        #: Where the yielded index tensors live: the device of the images they index.
        self.index_device = torch.device("cpu")
        # (epoch, batches to skip): set by resume_at, used by the next pass over that epoch.
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (Lightning calls this at every epoch start)."""
        self.epoch = epoch

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Continue an interrupted run: the next pass yields epoch ``epoch``'s batches from
        ``batches_done`` on (the next epoch's from the start if ``epoch`` was complete).

        ``len()`` still counts the whole epoch, as Lightning expects of a resumed loader.
        """
        if batches_done >= len(self):
            epoch, batches_done = epoch + 1, 0
        self.epoch = epoch
        self._resume = (epoch, batches_done) if batches_done > 0 else None

    def _rank_and_world_size(self) -> tuple[int, int]:
        dist = torch.distributed
        initialised = dist.is_available() and dist.is_initialized()
        rank = self.rank if self.rank is not None else (dist.get_rank() if initialised else 0)
        world_size = self.world_size
        if world_size is None:
            world_size = dist.get_world_size() if initialised else 1
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        return rank, world_size

    def _shard_size(self, rank: int, world_size: int) -> int:
        if self.drop_last:
            return self.num_items // world_size
        return len(range(rank, self.num_items, world_size))

    def _batch_size(self, shard_size: int) -> int:
        # A training batch larger than the shard becomes the whole shard (full-batch training,
        # e.g. L-BFGS) rather than an epoch with no batches at all.
        if self.drop_last and 0 < shard_size < self.batch_size:
            return shard_size
        return self.batch_size

    def _num_batches(self, shard_size: int) -> int:
        if not self.drop_last:
            return math.ceil(shard_size / self.batch_size)
        if shard_size == 0:
            raise ValueError(
                f"the training split ({self.num_items} images) has no image for each of the "
                "processes; use fewer devices or more data"
            )
        return shard_size // self._batch_size(shard_size)

    def __len__(self) -> int:
        """Number of batches this rank yields per epoch."""
        return self._num_batches(self._shard_size(*self._rank_and_world_size()))

    def __iter__(self) -> Iterator[Tensor]:
        rank, world_size = self._rank_and_world_size()
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_items, generator=generator)
        else:
            order = torch.arange(self.num_items)
        if self.drop_last:
            order = order[: self.num_items - self.num_items % world_size]
        shard = order[rank::world_size].to(self.index_device)
        batch_size = self._batch_size(len(shard))
        first = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            first = self._resume[1]
        self._resume = None
        for batch in range(first, self._num_batches(len(shard))):
            yield shard[batch * batch_size : (batch + 1) * batch_size]


class ImageDataModule(pl.LightningDataModule):
    """Base DataModule: uint8 splits on the CPU, float32 in [0, 1] on the device.

    Subclasses implement :attr:`image_shape` (from constructor arguments only, so a model can be
    built before any data is read) and :meth:`load_splits`.

    Args:
        data_dir: Root folder of the datasets.
        batch_size: Images per batch, per process.
        num_workers: DataLoader worker processes for splits decoded per batch (in-memory splits
            are served from the main process).
        seed: Run seed; drives the training shuffle.
        split_seed: Fixed seed for carving val/test and for static binarisation, so splits stay
            the same when the run seed changes.
        binarize: "none", "static" (every split binarised once at setup) or "dynamic" (val/test
            binarised once, training batches resampled on the device every step).
        on_device: Keep in-memory splits on the accelerator, so a batch is one gather there and
            nothing crosses the bus per step: True, False, or "auto" (when the trainer runs on a
            GPU and all splits take at most a quarter of its free memory). Ignored on the CPU.
    """

    def __init__(
        self,
        *,
        data_dir: str | os.PathLike[str],
        batch_size: int,
        num_workers: int,
        seed: int,
        split_seed: int,
        binarize: str,
        on_device: str | bool = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(data_dir, str | os.PathLike):
            raise ValueError(f"data.data_dir must be a path, got {data_dir!r}")
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        self.seed = check_int("seed", seed)
        self.split_seed = check_int("split_seed", split_seed)
        self.binarize = check_choice("binarize", binarize, BINARIZE_CHOICES)
        if not (on_device == "auto" or isinstance(on_device, bool)):
            raise ValueError(f"data.on_device must be auto, true or false, got {on_device!r}")
        self.on_device = on_device
        self.splits: dict[str, Dataset] | None = None
        # Splits moved to the accelerator, by split name; filled on first use of a dataloader.
        self._device_splits: dict[str, Dataset] = {}
        # (epoch, training batches done in it) from a checkpoint being resumed.
        self._resume_position: tuple[int, int] | None = None

    # (low, high) of the pixel values the model sees: to_float maps uint8 to [0, 1]. A subclass
    # that scales differently (e.g. normalised to mean 0) declares its own; training checks it
    # against the likelihood (a Bernoulli needs [0, 1]).
    value_range: tuple[float, float] = (0.0, 1.0)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image, known without touching the disk."""
        raise NotImplementedError

    def load_splits(self) -> dict[str, Dataset]:
        """Read the data and return the "train", "val" and "test" datasets (uint8 batches)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Load (and binarise) the splits once; later calls are no-ops."""
        if self.splits is not None:
            return
        splits = self.load_splits()
        if sorted(splits) != sorted(SPLIT_NAMES):
            raise RuntimeError(f"load_splits() must return {SPLIT_NAMES}, got {sorted(splits)}")
        for name, dataset in splits.items():
            if isinstance(dataset, TensorImages) and dataset.images.shape[1:] != self.image_shape:
                raise RuntimeError(
                    f"{name} images have shape {tuple(dataset.images.shape[1:])}, but "
                    f"image_shape is {self.image_shape}"
                )
        if self.binarize != "none":
            splits = self._binarize_splits(splits)
        self.splits = splits
        log.info(
            "%s: %s images of shape %s",
            type(self).__name__,
            ", ".join(f"{len(splits[name])} {name}" for name in SPLIT_NAMES),
            self.image_shape,
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
                raise TypeError(f"binarize needs in-memory splits, got {type(dataset).__name__}")
            binarized[name] = TensorImages(
                binarize_uint8(dataset.images, generator), dataset.labels
            )
        return binarized

    def _dataloader(self, split: str, train: bool) -> DataLoader:
        if self.splits is None:
            self.setup()
        dataset = self._device_splits[split] if split in self._device_splits else self._place(split)
        sampler = ShuffledBatchSampler(
            len(dataset), self.batch_size, shuffle=train, drop_last=train, seed=self.seed
        )
        if train and self._resume_position is not None:
            sampler.resume_at(*self._resume_position)
            self._resume_position = None
        if isinstance(dataset, TensorImages):
            sampler.index_device = dataset.images.device
        # In memory (host or device), a batch is one gather: worker processes would only add
        # copies, and cannot share device tensors.
        workers = 0 if isinstance(dataset, TensorImages) else self.num_workers
        # batch_size=None: each sampler item is a whole index tensor, gathered by the dataset.
        return DataLoader(
            dataset,
            sampler=sampler,
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            # Its own generator: each iter() draws a worker base seed, which would otherwise
            # advance the global RNG and shift every later random draw (resumed runs too).
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _accelerator(self) -> torch.device | None:
        """The trainer's device when it is not the CPU, else None."""
        strategy = getattr(getattr(self, "trainer", None), "strategy", None)
        if strategy is None:
            return None
        device = strategy.root_device
        return None if device.type == "cpu" else device

    def _place(self, split: str) -> Dataset:
        """The split, moved to the accelerator once if ``on_device`` asks for it."""
        dataset = self.splits[split]
        device = self._accelerator()
        if device is None or self.on_device is False or not isinstance(dataset, TensorImages):
            return dataset
        if self.on_device == "auto" and not self._fits_on(device):
            return dataset
        moved = TensorImages(dataset.images.to(device), dataset.labels.to(device))
        self._device_splits[split] = moved
        return moved

    def _fits_on(self, device: torch.device) -> bool:
        total = sum(
            d.images.numel() + 8 * d.labels.numel()
            for d in self.splits.values()
            if isinstance(d, TensorImages)
        )
        if device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(device)
        fits = total <= ON_DEVICE_MAX_FREE_FRACTION * free
        if not fits:
            log.info(
                "data.on_device=auto: the splits (%.1f GiB) stay in host memory; %.1f GiB free "
                "on %s",
                total / 2**30,
                free / 2**30,
                device,
            )
        return fits

    def state_dict(self) -> dict[str, Any]:
        """Where training stands, saved in every checkpoint: the epoch and how many of its
        batches were trained on. A resumed run continues with the next batch of the same
        permutation, where Lightning alone would start the interrupted epoch again."""
        trainer = getattr(self, "trainer", None)
        # Also while validating inside fit: ModelCheckpoint saves at the end of validation.
        if trainer is None or trainer.state.fn != "fit":
            return {}
        # Imported here: only a running trainer calls this, and data/ imports no training code.
        from vae_experiments.training.lightning_compat import train_batches_fetched

        # Checkpoints are written between steps, so every batch fetched so far was trained on
        # (the data fetcher's look-ahead is not counted here).
        epoch, done = trainer.current_epoch, train_batches_fetched(trainer)
        if done >= trainer.num_training_batches:  # also when limit_train_batches ends epochs
            epoch, done = epoch + 1, 0
        return {"train_epoch": epoch, "train_batches_done": done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; the next training loader starts where it says."""
        if "train_epoch" in state:
            self._resume_position = (int(state["train_epoch"]), int(state["train_batches_done"]))

    def train_dataloader(self) -> DataLoader:
        """Shuffled full batches of uint8 (B, C, H, W) images and int64 (B,) labels."""
        return self._dataloader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in order, last batch possibly partial."""
        return self._dataloader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in order, last batch possibly partial."""
        return self._dataloader("test", train=False)

    @staticmethod
    def to_float(images: Tensor) -> Tensor:
        """Convert uint8 images (B, C, H, W) to float32 in [0, 1] on their current device."""
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {images.dtype}")
        return images.float().div_(255)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> tuple[Tensor, Tensor]:
        """Turn a device batch into float32 images (B, C, H, W) in [0, 1] and int64 labels (B,).

        Under ``binarize="dynamic"`` training images are resampled from Bernoulli(x) each step.
        """
        images, labels = batch
        x = self.to_float(images)
        if self.binarize == "dynamic" and self.trainer is not None and self.trainer.training:
            x = torch.bernoulli(x)
        return x, labels
