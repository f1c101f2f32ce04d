"""Building objects from config nodes: ``_target_`` (nested), ``_partial_``, an allow-list, and
one error type for bad values.

This is the one place where a config becomes objects, for training and for loading a run alike,
with no Hydra import: a notebook that loads a run needs only torch and OmegaConf. It does what
``hydra.utils.instantiate`` does for our configs, and two things more:

- **Only targets we ship are built.** A run directory may come from someone else; its config
  must not be able to name ``os.system`` or ``torch.hub.load``. A ``_target_`` is checked against
  :data:`ALLOWED_TARGETS` as a string, *before* any module is imported, and must then be a class.
- **Every bad value is reported with its key.** Arguments are bound to the target's signature
  (an unknown key gets the closest valid name), checked against its type hints
  (``optimizer.lr=abc`` -> "must be a number"), non-finite numbers are refused, and a
  :class:`ConfigError` raised by a constructor about one of its arguments gets the node's key
  put in front (``model.network.hidden_dims=[0] is invalid: ...``).

Value rules (ranges, choices) live in the constructors, once; :func:`check` runs the key and type
checks without building anything, so a typo fails before any data is read.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import math
import os
import pathlib
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

#: ``_target_`` prefixes that may be built from a config. Each must name classes only (checked
#: after import): our models' parts, data sources and TensorBoard logger, torch's optimizers and
#: LR schedulers, and Lightning's trainer and loggers.
ALLOWED_TARGETS: tuple[str, ...] = (
    "vae_experiments.models.",
    "vae_experiments.data.",
    "vae_experiments.training.trackers.TensorBoardLogger",
    "torch.optim.",
    "pytorch_lightning.Trainer",
    "pytorch_lightning.trainer.trainer.Trainer",
    "pytorch_lightning.loggers.",
    "lightning.pytorch.Trainer",
    "lightning.pytorch.loggers.",
)

RESERVED_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")


def format_value(value: Any) -> str:
    """A value as it is typed on the command line: ``0.5``, ``mlp``, ``null``, ``[8, 16]``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def join_key(*parts: str) -> str:
    """``join_key("model", "network", "hidden_dims")`` -> ``model.network.hidden_dims``."""
    return ".".join(part for part in parts if part)


class ConfigError(ValueError):
    """A config value that cannot work. The message names the key, its value and what is allowed,
    in the form the command line takes: ``model.latent_dim=0 is invalid: must be an integer >= 1``.

    Constructors raise it about their own arguments (``ConfigError("latent_dim", 0, "must be an
    integer >= 1")``); :func:`instantiate` puts the config node's key in front.

    Args:
        key: the argument's name (or dotted key) the error is about; empty for a general message.
        value: the bad value.
        allowed: what is allowed, e.g. ``must be one of mlp, conv``. Without ``key``: the message.
    """

    _NO_VALUE = object()

    def __init__(self, key: str = "", value: Any = _NO_VALUE, allowed: str = "") -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(self._message())

    def _message(self) -> str:
        if not self.key:
            return self.allowed
        if self.value is self._NO_VALUE:
            return f"{self.key}: {self.allowed}"
        return f"{self.key}={format_value(self.value)} is invalid: {self.allowed}"

    def under(self, prefix: str) -> ConfigError:
        """The same error with ``prefix`` (a config node's key) in front of its key."""
        if not prefix:
            return self
        if not self.key:
            return ConfigError(prefix, allowed=self.allowed)
        return ConfigError(join_key(prefix, self.key), self.value, self.allowed)


def raise_all(problems: Sequence[ConfigError]) -> None:
    """Raises the one problem as it is, several as one :class:`ConfigError` listing each."""
    if len(problems) == 1:
        raise problems[0]
    if problems:
        lines = "\n  ".join(str(p) for p in problems)
        raise ConfigError(allowed=f"{len(problems)} invalid config values:\n  {lines}")


# ---------------------------------------------------------------------------------------------
# Resolving a target


def resolve_target(path: str, key: str = "") -> type:
    """The class that ``_target_: path`` names, if the allow-list lets it be built.

    The string is checked before anything is imported: importing a module runs its code.

    Raises:
        ConfigError: naming ``<key>._target_`` if the target is not allowed, not found, or not
            a class.
    """
    where = join_key(key, "_target_")
    if not isinstance(path, str) or not path:
        raise ConfigError(where, path, "must be the dotted name of a class")
    if not any(path == prefix or path.startswith(prefix) for prefix in ALLOWED_TARGETS):
        raise ConfigError(
            where,
            path,
            "not a target that vae-experiments builds (a config may only name our models and "
            "data sources, torch.optim optimizers and LR schedulers, and Lightning's Trainer "
            "and loggers); if this config came with a run directory, do not trust it",
        )
    target: Any = None
    # Walk down from the longest importable module: ``a.b.C`` or ``a.b.C.D`` (nested class).
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for name in parts[split:]:
                target = getattr(target, name)
        except AttributeError:
            target = None
        break
    if target is None:
        raise ConfigError(
            where, path, "no such class (check the spelling and the installed version)"
        )
    if not isinstance(target, type):
        raise ConfigError(where, path, "must name a class, not a function or module")
    return target


# ---------------------------------------------------------------------------------------------
# Type checks against the constructor's hints

_NUMBER_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _is_tensor_type(hint: Any) -> bool:
    """Whether ``hint`` is ``torch.Tensor``. A hint can only be one once its class's module
    imported torch, so torch is not imported here: checking a config needs no torch."""
    torch = sys.modules.get("torch")
    return torch is not None and hint is torch.Tensor


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if hint in _NUMBER_WORDS:
        return _NUMBER_WORDS[hint]
    if hint is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        # A config value is never a tensor: ``lr: float | Tensor`` is described as a number.
        args = [arg for arg in typing.get_args(hint) if not _is_tensor_type(arg)]
        return " or ".join(_describe(arg) for arg in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(format_value(a) for a in typing.get_args(hint))
    if origin in (list, tuple, Sequence, typing.Sequence):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        inner = _describe(args[0]) if args and len(set(args)) == 1 else None
        return f"a list of {inner.removeprefix('an ').removeprefix('a ')}s" if inner else "a list"
    if isinstance(hint, type):
        return f"a config node with a _target_ building a {hint.__name__}"
    return getattr(hint, "__name__", str(hint))


def _matches(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` fits ``hint``: True, False, or None when the hint is not one we check
    (then nothing is said)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return None
    origin = typing.get_origin(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (typing.Union, types.UnionType):
        answers = [_matches(value, arg) for arg in typing.get_args(hint)]
        if any(answer is True for answer in answers):
            return True
        return None if any(answer is None for answer in answers) else False
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple, Sequence, typing.Sequence):
        if not isinstance(value, list | tuple):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if not args:
            return True
        if origin is tuple and len(args) > 1:
            if len(args) != len(value):
                return False
            answers = [_matches(v, a) for v, a in zip(value, args, strict=True)]
        else:
            answers = [_matches(v, args[0]) for v in value]
        if any(answer is False for answer in answers):
            return False
        return True if all(answer is True for answer in answers) else None
    if _is_tensor_type(hint):
        return False  # a config value is never a tensor: ``lr: float | Tensor`` wants a number
    if isinstance(hint, type):
        if isinstance(value, hint):
            return True
        if issubclass(hint, os.PathLike | pathlib.PurePath):
            return None  # a path given as a string: the constructor converts it
        # A part (a network, a likelihood) given as a plain value: ``model.network=mlp``.
        return False if isinstance(value, str | int | float | bool | list | dict) else None
    return None  # anything fancier: not ours to judge


def _type_hints(target: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(target.__init__)
    except Exception:  # hints that do not evaluate on this Python: check nothing
        return {}


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list | tuple):
        return any(_non_finite(v) for v in value)
    return False


def _signature(target: type) -> inspect.Signature | None:
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):
        return None


def _check_arguments(
    target: type, params: Mapping[str, Any], key: str, supplied: Sequence[str], partial: bool
) -> list[ConfigError]:
    """Problems of binding ``params`` (plus the names in ``supplied``, given at build time) to
    ``target``'s constructor: unknown keys, missing required keys, wrong types, nan/inf."""
    problems: list[ConfigError] = []
    signature = _signature(target)
    if signature is None:
        return problems
    parameters = signature.parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    names = [n for n, p in parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    hints = _type_hints(target)
    for name, value in params.items():
        full = join_key(key, name)
        if name not in parameters and not takes_any:
            close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
            hint = f"did you mean `{join_key(key, close[0])}`? " if close else ""
            problems.append(
                ConfigError(
                    full,
                    allowed=f"not a parameter of {target.__name__}; {hint}"
                    f"it takes {', '.join(names) or 'nothing'}",
                )
            )
            continue
        if isinstance(value, Mapping) and "_target_" in value:
            continue  # a nested object: checked on its own
        if _non_finite(value):
            problems.append(ConfigError(full, value, "must be a finite number"))
            continue
        if name in hints and _matches(value, hints[name]) is False:
            problems.append(ConfigError(full, value, f"must be {_describe(hints[name])}"))
    if not partial:
        given = set(params) | set(supplied)
        for name, parameter in parameters.items():
            required = parameter.default is inspect.Parameter.empty and parameter.kind in (
                parameter.POSITIONAL_OR_KEYWORD,
                parameter.KEYWORD_ONLY,
            )
            if required and name not in given:
                problems.append(
                    ConfigError(join_key(key, name), allowed=f"required by {target.__name__}")
                )
    return problems


# ---------------------------------------------------------------------------------------------
# Building


def to_container(node: Any) -> Any:
    """A config node as plain dicts and lists, interpolations resolved; a missing value (``???``)
    raises ``MissingMandatoryValue`` naming its full key."""
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    return node


def _split(node: Mapping[str, Any]) -> tuple[Any, bool, dict[str, Any]]:
    params = {k: v for k, v in node.items() if k not in RESERVED_KEYS}
    return node.get("_target_"), bool(node.get("_partial_", False)), params


def problems(node: Any, key: str = "", supplied: Sequence[str] = ()) -> list[ConfigError]:
    """What :func:`check` would raise, as a list (empty when the node would build)."""
    found: list[ConfigError] = []

    def visit(value: Any, where: str, given: Sequence[str]) -> None:
        if isinstance(value, Mapping) and value.get("_target_") is not None:
            target_path, partial, params = _split(value)
            try:
                target = resolve_target(target_path, where)
            except ConfigError as error:
                found.append(error)
                return
            found.extend(_check_arguments(target, params, where, given, partial))
            for name, child in params.items():
                visit(child, join_key(where, name), ())
        elif isinstance(value, list):
            for index, child in enumerate(value):
                visit(child, f"{where}[{index}]", ())

    visit(to_container(node), key, supplied)
    return found


def check(node: Any, key: str = "", supplied: Sequence[str] = ()) -> None:
    """Checks a config node as :func:`instantiate` would, without building anything: targets
    allowed, keys known, required keys present, types right.

    Args:
        node: a config node with a ``_target_`` (nested ones are checked too).
        key: the node's key, for messages (``model``).
        supplied: arguments that will be passed at build time (``image_shape``).

    Raises:
        ConfigError: naming every problem.
    """
    raise_all(problems(node, key, supplied))


def instantiate(node: Any, key: str = "", **kwargs: Any) -> Any:
    """Builds the object a config node describes.

    Nested nodes with a ``_target_`` are built first and passed in; ``_partial_: true`` gives a
    ``functools.partial`` (an optimizer that gets its parameters later); ``_target_: null``
    gives None (``logger=none``). Plain values are passed as plain Python containers.

    Args:
        node: a ``DictConfig`` or mapping with a ``_target_``.
        key: the node's key, for messages (``model``, ``data.source``).
        **kwargs: more arguments for the top-level target (``image_shape=...``).

    Raises:
        ConfigError: a target that is not allowed, an unknown or missing key, a wrong type, or a
            value its constructor refused; the message names the key.
    """
    node = to_container(node)
    if node is None or (isinstance(node, Mapping) and node.get("_target_", "") is None):
        return None
    if not isinstance(node, Mapping) or "_target_" not in node:
        raise ConfigError(key or "config", allowed="needs a _target_ naming what to build")
    return _build(node, key, kwargs)


def _build(node: Mapping[str, Any], key: str, kwargs: Mapping[str, Any]) -> Any:
    target_path, partial, params = _split(node)
    target = resolve_target(target_path, key)
    raise_all(_check_arguments(target, params, key, list(kwargs), partial))
    built = {name: _build_value(value, join_key(key, name)) for name, value in params.items()}
    built.update(kwargs)
    if partial:
        return _keyed_partial(target, key, built)
    return _call(target, key, built)


def _build_value(value: Any, key: str) -> Any:
    if isinstance(value, Mapping) and value.get("_target_") is not None:
        return _build(value, key, {})
    if isinstance(value, Mapping) and "_target_" in value:
        return None
    if isinstance(value, list):
        return [_build_value(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


def _call(target: Callable[..., Any], key: str, arguments: Mapping[str, Any]) -> Any:
    try:
        return target(**arguments)
    except ConfigError as error:
        raise error.under(key) from None


def _keyed_partial(target: type, key: str, arguments: Mapping[str, Any]) -> Callable[..., Any]:
    """``functools.partial(target, **arguments)`` (keywords given at the call replace the
    config's, as a partial's do) whose ConfigErrors name ``key`` when called;
    a ``ValueError`` from a torch optimizer or scheduler about its arguments (``Invalid learning
    rate: -1``) becomes a ConfigError naming the node too."""

    @functools.wraps(target)
    def build(*args: Any, **more: Any) -> Any:
        try:
            return target(*args, **{**arguments, **more})
        except ConfigError as error:
            raise error.under(key) from None
        except ValueError as error:
            shown = ", ".join(f"{k}={format_value(v)}" for k, v in arguments.items())
            raise ConfigError(
                key, allowed=f"{target.__name__}({shown}) refused its arguments: {error}"
            ) from None

    build.func = target  # type: ignore[attr-defined]  # what it builds, as on a partial
    build.keywords = dict(arguments)  # type: ignore[attr-defined]
    return build
