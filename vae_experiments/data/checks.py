"""Config validation helpers that fail fast with messages naming the ``data.*`` key."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def check_int(key: str, value: Any, minimum: int | None = None) -> int:
    """Return ``value`` if it is an int (not a bool) and ``>= minimum``, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"data.{key} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"data.{key} must be >= {minimum}, got {value}")
    return value


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise ValueError listing them."""
    choices = tuple(choices)
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"data.{key} must be one of {allowed}, got {value!r}")
    return value


def check_split_size(key: str, value: Any) -> int | float:
    """Validate a split size: an int >= 0 (number of images) or a float in (0, 1) (a fraction)."""
    is_count = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    is_fraction = isinstance(value, float) and 0.0 < value < 1.0
    if not (is_count or is_fraction):
        raise ValueError(
            f"data.{key} must be an int >= 0 (number of images) or a float in (0, 1) "
            f"(fraction of the images), got {value!r}"
        )
    return value


def check_bool(key: str, value: Any) -> bool:
    """Return ``value`` if it is a bool, else raise ValueError."""
    if not isinstance(value, bool):
        raise ValueError(f"data.{key} must be true or false, got {value!r}")
    return value
