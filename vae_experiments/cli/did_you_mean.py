"""Suggestions for misspelled keys on the command line: ``did you mean `model.latent_dim`?``.

Hydra rejects ``model.latent_dims=8`` while composing the config ("Key 'latent_dims' is not in
struct"), before our code runs, and the OmegaConf that hydra-core 1.3 pins makes no suggestions.
:func:`suggest_keys_on_failure` wraps a ``@hydra.main`` function: when it exits with an error, the
command line's overrides are checked against the configs they would compose (each choice of a
swept config group, for ``-m``), and each unknown key is printed with the closest valid one.
Keys of the old flat model and data configs (``model.arch=mlp``, ``data.image_size=64``) get
what replaced them (``model/network=mlp``, ``data.source.image_size=64``, or why the chosen data
has no such setting: ``configs/old_keys.py``), and a part chosen like a value
(``model.likelihood=gaussian``) gets its config group (``model/likelihood=gaussian``). Nothing
is done when the command succeeds.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from omegaconf import OmegaConf

from vae_experiments.cli import hydra_compat
from vae_experiments.configs.old_keys import old_key_message

F = TypeVar("F", bound=Callable[..., Any])

# Group choices of a sweep beyond this many combinations are not composed (each takes ~0.1 s).
MAX_COMBINATIONS = 16


def group_choice_message(tree: dict, key: str, value: str, options: Sequence[str]) -> str | None:
    """A hint for ``key=value`` where ``key`` is a part built from a config group (a node with a
    ``_target_``) and ``value`` one of the group's ``options``: the part is chosen with
    ``group=value``, not replaced by a string. None otherwise."""
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if not (isinstance(node, dict) and "_target_" in node) or value not in options:
        return None
    return f"{key} is chosen from a config group: use `{key.replace('.', '/')}={value}`"


def closest_key_message(tree: dict, key: str) -> str | None:
    """Why ``key`` (a dotted path) is not in ``tree`` (a plain nested dict), or None if it is.

    The message names the closest existing key at the first level where the path breaks
    (``model.latent_dims`` -> ``model.latent_dim``; ``model.nois.std`` -> ``model.noise.std``),
    or lists the keys there when none is close.
    """
    node: Any = tree
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, dict):
            return None  # a list index or a key below a value: Hydra's own message says it
        if part in node:
            node = node[part]
            continue
        names = sorted(str(name) for name in node)
        close = difflib.get_close_matches(part, names, n=1, cutoff=0.6)
        if close:
            suggestion = ".".join([*parts[:depth], close[0], *parts[depth + 1 :]])
            return f"{key} is not a config key: did you mean `{suggestion}`?"
        where = ".".join(parts[:depth]) or "the top level of the config"
        return f"{key} is not a config key; {where} has: {', '.join(names)}"
    return None


def unknown_key_messages(config_dir: str, config_name: str, overrides: Sequence[str]) -> list[str]:
    """One message per override whose key is not in the config it would be applied to.

    Args:
        config_dir: absolute path of the primary config directory.
        config_name: the primary config (e.g. ``train``).
        overrides: the command line's overrides, sweeps allowed (``model=ae,vae``).

    Returns:
        Messages from :func:`closest_key_message`, with ``(with model=ae)`` appended where the key
        is missing only for some choices of a swept group. Empty if the overrides cannot be
        parsed or no config can be composed (Hydra's own message covers those cases).
    """
    try:
        parsed = hydra_compat.parse_overrides(overrides)
    except Exception:
        return []
    # Inside a running Hydra app (compare_pca composes train.yaml in its task), leave its state
    # as it was.
    with hydra_compat.fresh_global_hydra():
        return _messages(config_dir, config_name, parsed)


def _messages(config_dir: str, config_name: str, parsed: list) -> list[str]:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        groups = hydra_compat.config_groups()
        group_choices: list[list[str]] = []  # per group override: its choices as overrides
        additions: list[str] = []  # +key=value: they create keys that later overrides may set
        keys: list[tuple[str, str]] = []  # key=value overrides: (key, value as typed)
        for override in parsed:
            if override.package is not None or override.is_delete():
                continue
            line = override.input_line
            prefix = line[: len(line) - len(line.lstrip("+"))]
            if override.key_or_group in groups:
                if override.is_sweep_override():
                    try:
                        values = list(override.sweep_string_iterator())
                    except Exception:
                        continue
                    group_choices.append(
                        [f"{prefix}{override.key_or_group}={value}" for value in values]
                    )
                else:
                    group_choices.append([line])
            elif override.is_add() or override.is_force_add():
                if not override.is_sweep_override():
                    additions.append(line)
            else:
                keys.append((override.key_or_group, line.partition("=")[2]))
        if not keys:
            return []
        combinations = list(itertools.islice(itertools.product(*group_choices), MAX_COMBINATIONS))
        swept = [choices for choices in group_choices if len(choices) > 1]
        messages: list[str] = []
        for combination in combinations:
            tree = None
            for extra in (additions, []):
                try:
                    cfg = compose(
                        config_name, overrides=[*combination, *extra], return_hydra_config=True
                    )
                except Exception:
                    continue
                tree = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
                break
            if tree is None:
                continue
            where = [choice for choice in combination if swept and any(choice in c for c in swept)]
            for key, value in keys:
                message = closest_key_message(tree, key)
                if message is not None:
                    message = old_key_message(key, value, tree) or message
                elif key.replace(".", "/") in groups:
                    options = hydra_compat.group_options(key.replace(".", "/"))
                    message = group_choice_message(tree, key, value, options)
                if message is None:
                    continue
                if where:
                    message += f" (with {' '.join(where)})"
                if message not in messages:
                    messages.append(message)
    return messages


def _command_line(argv: Sequence[str], config_name: str) -> tuple[str, list[str]] | None:
    """(config name, overrides) of a Hydra command line; None if it uses another config dir."""
    try:
        command_line = hydra_compat.parse_command_line(argv)
    except (Exception, SystemExit):
        return None
    if command_line.other_config_dir:
        return None
    return command_line.config_name or config_name, command_line.overrides


def suggest_keys_on_failure(config_dir: str, config_name: str) -> Callable[[F], F]:
    """Decorator for a ``@hydra.main`` function: on an error exit, print key suggestions.

    Place it above ``@hydra.main(config_path=config_dir, config_name=config_name)``. The
    suggestions go to stderr after Hydra's own message; the exit status is unchanged.
    """

    def decorate(main: F) -> F:
        @functools.wraps(main)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return main(*args, **kwargs)
            except SystemExit as exit_:
                if exit_.code not in (0, None) and not args and not kwargs:
                    print_suggestions(config_dir, config_name, sys.argv[1:])
                raise

        return wrapper  # type: ignore[return-value]

    return decorate


def print_suggestions(config_dir: str, config_name: str, argv: Sequence[str]) -> None:
    """Writes :func:`unknown_key_messages` for a command line to stderr (nothing if none)."""
    command_line = _command_line(argv, config_name)
    if command_line is None:
        return
    try:
        messages = unknown_key_messages(config_dir, *command_line)
    except Exception:  # a suggestion must never hide Hydra's own message
        return
    for message in messages:
        sys.stderr.write(message + "\n")
