"""The shipped Hydra configs (``train.yaml``, ``evaluate.yaml``, ... and the config groups).

They are package data, so a non-editable ``pip install`` finds them too; every entry point and
test asks :data:`CONFIG_DIR` for their place.
"""

from pathlib import Path

#: The folder holding ``train.yaml`` and the group folders, as a string for Hydra.
CONFIG_DIR = str(Path(__file__).resolve().parent)
