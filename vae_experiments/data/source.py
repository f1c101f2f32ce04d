"""What every data source provides: the shape of its images and its three splits."""

from __future__ import annotations

from torch.utils.data import Dataset


class ImageSource:
    """Base of the data sources (digits, MNIST, CelebA, image folders, synthetic).

    A source knows the shape of its images from its arguments alone, so a model can be built
    before any data is read, and loads its "train", "val" and "test" splits as uint8 images
    (N, C, H, W) with int64 labels (N,) (indices into :attr:`class_names`; all 0 for a source
    without classes), or (N, F) for a source with known factors (each column the index of a
    factor's value, see :attr:`factor_names`):
    :class:`~vae_experiments.data.batches.TensorImages` in memory, or
    :class:`~vae_experiments.data.files.ImageFiles` decoded per batch. Batching, binarisation
    and devices are :class:`~vae_experiments.data.images.ImageData`'s business.
    """

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image, known without touching the disk."""
        raise NotImplementedError

    @property
    def class_names(self) -> list[str] | None:
        """The names of the classes the labels index (label ``i`` is ``class_names[i]``), or
        None when the source has no class labels (its labels are all 0). Known before the
        images are read; a folder source lists its folder."""
        return None

    @property
    def factor_names(self) -> tuple[str, ...] | None:
        """The factors of variation the label columns index (``labels[:, f]`` is the index of
        factor ``factor_names[f]``'s value), or None for class-labelled or unlabelled data,
        whose labels are (N,)."""
        return None

    @property
    def factor_sizes(self) -> tuple[int, ...] | None:
        """How many values each factor of :attr:`factor_names` takes (its labels run from 0 to
        the size - 1), or None without factors."""
        return None

    def carved_sizes(self) -> dict[str, int | float]:
        """Sizes of the splits carved out of the training images, by constructor argument
        (e.g. ``{"val_size": 0.083333}``); empty when the source has fixed splits."""
        return {}

    def prepare(self, split_seed: int, threads: int) -> None:
        """Fetch or decode what :meth:`load` reads (downloads, caches); once per machine.

        Args:
            split_seed: Seed of the val/test carving, independent of the run seed.
            threads: Threads that may decode files.
        """

    def load(self, split_seed: int, threads: int) -> dict[str, Dataset]:
        """Read the data and return the "train", "val" and "test" datasets (uint8 batches).

        Args:
            split_seed: Seed of the val/test carving, independent of the run seed.
            threads: Threads that may decode or check files.
        """
        raise NotImplementedError
