"""The one LightningDataModule: any :class:`~vae_experiments.data.images.ImageData` served to a
Trainer, with resumable DDP batches, splits kept on the GPU and floats made on the device.

The only module of ``vae_experiments.data`` that imports Lightning.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from vae_experiments.data.batches import (
    BatchGroup,
    ShuffledBatchSampler,
    TensorImages,
    make_loader,
)
from vae_experiments.data.images import ImageData

log = logging.getLogger(__name__)

#: ``on_device="auto"`` keeps the splits on the GPU when they take at most this share of its free
#: memory; the rest is left for the model, activations and the optimizer.
ON_DEVICE_MAX_FREE_FRACTION = 0.25


class ImageDataModule(pl.LightningDataModule):
    """uint8 batches from ``data``'s splits, float32 in [0, 1] on the device.

    Training batches can come in groups (``steps_per_item`` > 1): images (S, B, C, H, W), one
    optimizer step per batch, so that the training loop's per-batch work is paid once per group
    (see :class:`~vae_experiments.training.module.LitModel`).

    Args:
        data: The run's data; its splits are loaded at :meth:`setup`.

    Attributes:
        steps_per_item: Training batches per group at most; 1: single batches. Set before the
            training loader is built; only in-memory splits are grouped.
        max_train_batches: Training batches per epoch at most (``limit_train_batches`` counted
            in batches, when batches are grouped); None: all.
        groups_refused: Why this run's training cannot take groups of batches (see
            :func:`~vae_experiments.training.step_groups.ungrouped_because`); None: it can.
    """

    def __init__(self, data: ImageData) -> None:
        super().__init__()
        self.data = data
        self.steps_per_item = 1
        self.max_train_batches: int | float | None = None
        self.groups_refused: str | None = None
        # Splits moved to the accelerator, by split name; filled on first use of a dataloader.
        self._device_splits: dict[str, Dataset] = {}
        # (epoch, training batches done in it) from a checkpoint being resumed.
        self._resume_position: tuple[int, int] | None = None
        # The steps_per_item of the checkpoint being resumed (1 for checkpoints without it).
        self._resume_steps_per_item = 1
        self._train_sampler: ShuffledBatchSampler | None = None
        # [epoch, training batches of it that reached the device so far]
        self._train_progress = [0, 0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image, known without touching the disk."""
        return self.data.image_shape

    def prepare_data(self) -> None:
        """Downloads and decoded caches (Lightning calls this once per machine)."""
        self.data.prepare()

    def setup(self, stage: str | None = None) -> None:
        """Load the splits once; later calls are no-ops."""
        self.data.setup()

    def _dataloader(self, split: str, train: bool) -> DataLoader:
        self.data.setup()
        dataset = self._device_splits[split] if split in self._device_splits else self._place(split)
        batch_size = self.data.batch_size if train else self.data.eval_batch_size
        sampler = ShuffledBatchSampler(
            len(dataset), batch_size, shuffle=train, drop_last=train, seed=self.data.seed
        )
        if train:
            self._configure_train_sampler(sampler, dataset)
        if train and self._resume_position is not None:
            sampler.resume_at(*self._resume_position)
            self._resume_position = None
        if train:
            self._train_progress = [sampler.epoch, sampler.resume_batches_done]
            self._train_sampler = sampler
        # Its own generator: each iter() draws a worker base seed, which would otherwise
        # advance the global RNG and shift every later random draw (resumed runs too).
        generator = torch.Generator().manual_seed(self.data.seed)
        return make_loader(dataset, sampler, self.data.num_workers, generator)

    def _configure_train_sampler(self, sampler: ShuffledBatchSampler, dataset: Dataset) -> None:
        steps = self.steps_per_item if isinstance(dataset, TensorImages) else 1
        saved = self._resume_steps_per_item
        if self._resume_position is not None and self._resume_position[1] > 0 and saved != steps:
            # Lightning counts the interrupted epoch's batches in the groups they came in, and
            # finds the epoch's end (and its validation) by that count: the epoch must end in
            # groups of the same size (1 for checkpoints made without groups).
            epoch, done = self._resume_position
            if saved > 1 and self.groups_refused is not None:
                raise ValueError(
                    f"the checkpoint stopped inside epoch {epoch} (after {done} batches), which "
                    f"was trained in groups of {saved} steps (steps_per_group), and this run "
                    f"cannot train in groups: {self.groups_refused}. Resume it with the "
                    "settings it was trained with, or from a checkpoint written at an epoch's "
                    "end (checkpoints/best.ckpt)"
                )
            if saved > 1:
                log.info(
                    "the interrupted epoch %d goes on in groups of %d steps, as it was trained "
                    "(steps_per_group=%d takes effect in the next session)",
                    epoch,
                    saved,
                    self.steps_per_item,
                )
            steps = saved
        sampler.steps_per_item = steps
        sampler.max_batches = self.max_train_batches

    @property
    def train_batches_per_epoch(self) -> int:
        """Training batches (optimizer steps) per epoch on this process; 0 before the training
        loader is built."""
        return self._train_sampler.batches_per_epoch() if self._train_sampler else 0

    @property
    def counts_steps_itself(self) -> bool:
        """Whether the trainer's count of training batches is a count of groups (batches are
        grouped, and ``limit_train_batches`` is applied here), so that
        :attr:`train_batches_per_epoch` is the number of steps per epoch; otherwise the
        trainer's ``num_training_batches`` is."""
        return self._train_sampler is not None and self._train_sampler.steps_per_item > 1

    def train_batches_done(self, epoch: int) -> int:
        """Training batches of ``epoch`` that reached the device so far (between steps: how
        many were trained on)."""
        progress_epoch, done = self._train_progress
        return done if progress_epoch == epoch else 0

    def untrained(self, batches: int) -> None:
        """The last ``batches`` batches of the latest training group were not trained (training
        stopped inside the group): the position saved in checkpoints does not count them, so a
        resumed run trains them."""
        self._train_progress[1] -= batches

    def _accelerator(self) -> torch.device | None:
        """The trainer's device when it is not the CPU, else None."""
        strategy = getattr(getattr(self, "trainer", None), "strategy", None)
        if strategy is None:
            return None
        device = strategy.root_device
        return None if device.type == "cpu" else device

    def _place(self, split: str) -> Dataset:
        """The split, moved to the accelerator once if ``on_device`` asks for it."""
        dataset = self.data.splits[split]
        device = self._accelerator()
        on_device = self.data.on_device
        if device is None or on_device is False or not isinstance(dataset, TensorImages):
            return dataset
        if on_device == "auto" and not self._fits_on(device):
            return dataset
        moved = TensorImages(dataset.images.to(device), dataset.labels.to(device))
        self._device_splits[split] = moved
        return moved

    def _fits_on(self, device: torch.device) -> bool:
        total = sum(
            d.images.numel() + 8 * d.labels.numel()
            for d in self.data.splits.values()
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
        if trainer is None or trainer.state.fn != "fit" or self._train_sampler is None:
            return {}
        # Checkpoints are written between steps, so every batch that reached the device was
        # trained on (the data fetcher's look-ahead has not: it is transferred when its turn
        # comes).
        epoch = trainer.current_epoch
        done = self.train_batches_done(epoch)
        if done >= self.train_batches_per_epoch:  # also when limit_train_batches ends epochs
            epoch, done = epoch + 1, 0
        return {
            "train_epoch": epoch,
            "train_batches_done": done,
            "steps_per_item": self._train_sampler.steps_per_item,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict`; the next training loader starts where it says."""
        if "train_epoch" in state:
            self._resume_position = (int(state["train_epoch"]), int(state["train_batches_done"]))
            self._resume_steps_per_item = int(state.get("steps_per_item", 1))

    def train_dataloader(self) -> DataLoader:
        """Shuffled full batches of uint8 (B, C, H, W) images and int64 (B,) labels ((B, F)
        for data with known factors)."""
        return self._dataloader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in order, last batch possibly partial."""
        return self._dataloader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in order, last batch possibly partial."""
        return self._dataloader("test", train=False)

    def on_after_batch_transfer(
        self, batch: Any, dataloader_idx: int
    ) -> tuple[Tensor | BatchGroup, Tensor]:
        """Turn a device batch into float32 images (B, C, H, W) and int64 labels (B,), a group
        of training batches into a :class:`BatchGroup` of S such batches and labels (S, B); and
        count the training batches. Factor labels keep their last dimension: (B, F), (S, B, F).

        Under ``binarize="dynamic"`` training images are resampled from Bernoulli(x) each step.
        A group's batches are converted (and resampled) one at a time, as they are taken: in
        the same order of random draws as without groups, and each batch's floats made while
        its uint8 images are still in the cache.
        """
        images, labels = batch
        training = self.trainer is not None and self.trainer.training
        if not training:
            return self.data.to_float(images), labels
        steps = images.shape[0] if images.ndim == 5 else 1  # a group: (S, B, C, H, W)
        epoch = self.trainer.current_epoch
        self._train_progress = [epoch, self.train_batches_done(epoch) + steps]
        if images.ndim == 5:
            return BatchGroup(images, self._training_batch), labels
        return self._training_batch(images), labels

    def _training_batch(self, images: Tensor) -> Tensor:
        """uint8 training images (B, C, H, W) as float32, resampled under dynamic binarisation."""
        x = self.data.to_float(images)
        return torch.bernoulli(x) if self.data.binarize == "dynamic" else x
