"""Value rules of the data constructors, raising :class:`~vae_experiments.targets.ConfigError`
about the constructor's own argument (``targets.instantiate`` puts the config key in front)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vae_experiments.targets import ConfigError, format_value


def at_least(name: str, value: int, minimum: int) -> int:
    """Return ``value`` if it is an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, value, f"must be an integer >= {minimum}")
    return value


def one_of(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``."""
    choices = tuple(choices)
    # True == 1: a bool is only one of the choices if it is itself listed.
    if value not in choices or (isinstance(value, bool) and all(c is not value for c in choices)):
        raise ConfigError(name, value, f"must be one of {', '.join(map(format_value, choices))}")
    return value


def split_size(name: str, value: int | float) -> int | float:
    """Return a split size: an int >= 0 (number of images) or a float in (0, 1) (a fraction)."""
    is_count = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    is_fraction = isinstance(value, float) and 0.0 < value < 1.0
    if not (is_count or is_fraction):
        raise ConfigError(
            name,
            value,
            "must be an int >= 0 (number of images) or a float in (0, 1) (fraction of the images)",
        )
    return value


def as_path(name: str, value: str | os.PathLike[str]) -> Path:
    """``value`` as a Path, ``~`` expanded."""
    if not isinstance(value, str | os.PathLike):
        raise ConfigError(name, value, "must be a path")
    return Path(value).expanduser()
