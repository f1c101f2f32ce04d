"""The one error of bad data: input files or folders that cannot be used as they are.

A source raises :class:`DataError` while it prepares or loads its data (a folder without
images, a corrupt JPEG, an IDX file that is no IDX file, a CelebA folder without its partition
list): a mistake of the input, not of the program. Its message is one line naming the file or
folder, what is wrong with it and how to fix it, so that a command can print it as its one
``error:`` line, as it does for a config mistake (``vae_experiments/cli/run_dirs.py``), and a
notebook can catch it as the ``ValueError`` it is.

Plain Python: no torch, Lightning or Hydra.
"""

from __future__ import annotations


class DataError(ValueError):
    """An input file or folder that cannot be used: missing, empty, corrupt, or not in its
    format. ``str()`` is one line: the file, what is wrong, the fix."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A :class:`DataError` for data that is not where the config says (no such folder, no
    images in it, files missing); also a ``FileNotFoundError``."""
