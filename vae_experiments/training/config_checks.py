"""Checks of a composed training config, before any data is read or any model is built.

Every message names the key, the bad value and what is allowed, in the form the command line
takes, e.g. ``model.latent_dim=0 is invalid: must be an integer >= 1``. A check applies only
where the key exists, so configs of models or data that lack a key are not affected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from vae_experiments.models.corruption import NOISE_KINDS
from vae_experiments.models.likelihoods import LIKELIHOODS, RECON_LOSSES
from vae_experiments.models.networks import ARCHS, conv_feature_sizes

TEST_CKPT_CHOICES = ("best", "last")
GRADIENT_CLIP_ALGORITHMS = ("norm", "value")


class ConfigError(ValueError):
    """A config value that cannot work; the message says which key, its value and the rule."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int_at_least(minimum: int) -> Callable[[Any], str | None]:
    def rule(value: Any) -> str | None:
        return None if _is_int(value) and value >= minimum else f"must be an integer >= {minimum}"

    return rule


def _number(
    low: float, high: float | None = None, *, low_open: bool = False
) -> Callable[[Any], str | None]:
    """A number >= low (> low if ``low_open``), and < high when a high is given."""
    if high is None:
        text = f"must be a number {'>' if low_open else '>='} {low:g}"
    else:
        text = f"must be a number in {'(' if low_open else '['}{low:g}, {high:g})"

    def rule(value: Any) -> str | None:
        if not _is_number(value) or value < low or (low_open and value == low):
            return text
        return None if high is None or value < high else text

    return rule


def _one_of(choices: Sequence[Any]) -> Callable[[Any], str | None]:
    def rule(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(map(str, choices))}"

    return rule


def _int_list(*, non_empty: bool) -> Callable[[Any], str | None]:
    text = "must be a list of integers >= 1" + (", not empty" if non_empty else "")

    def rule(value: Any) -> str | None:
        if not isinstance(value, list | tuple) or (non_empty and not value):
            return text
        return None if all(_is_int(v) and v >= 1 for v in value) else text

    return rule


def _optional(rule: Callable[[Any], str | None], off: str) -> Callable[[Any], str | None]:
    """``rule``, or null (which means ``off``)."""

    def optional_rule(value: Any) -> str | None:
        allowed = None if value is None else rule(value)
        if allowed is None:
            return None
        return f"must be null ({off}) or {allowed.removeprefix('must be ')}"

    return optional_rule


def _max_epochs(value: Any) -> str | None:
    if value is None or (_is_int(value) and (value >= 0 or value == -1)):
        return None
    return "must be an integer >= 0, or -1 (no limit)"


# key -> rule returning None when the value is allowed, else what is allowed.
RULES: dict[str, Callable[[Any], str | None]] = {
    "seed": _int_at_least(0),
    "test_ckpt": _one_of(TEST_CKPT_CHOICES),
    "model.latent_dim": _int_at_least(1),
    "model.arch": _one_of(ARCHS),
    "model.hidden_dims": _int_list(non_empty=False),
    "model.conv_channels": _int_list(non_empty=True),
    "model.recon_loss": _one_of(RECON_LOSSES),
    "model.likelihood": _one_of(LIKELIHOODS),
    "model.sigma": _number(0, low_open=True),
    "model.beta": _number(0),
    "model.kl_warmup_steps": _int_at_least(0),
    "model.noise.kind": _one_of(NOISE_KINDS),
    "model.noise.std": _number(0),
    "model.noise.p": _number(0, 1),
    "trainer.max_epochs": _max_epochs,
    # A negative clip value would flip the gradients' sign (torch clips by max_norm / norm).
    "trainer.gradient_clip_val": _optional(_number(0), off="no clipping"),
    "trainer.gradient_clip_algorithm": _one_of(GRADIENT_CLIP_ALGORITHMS),
}


def format_value(value: Any) -> str:
    """A value as it is typed on the command line: ``0.5``, ``mlp``, ``null``, ``[8, 16]``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


def invalid(key: str, value: Any, allowed: str) -> str:
    """``"<key>=<value> is invalid: <allowed>"``."""
    return f"{key}={format_value(value)} is invalid: {allowed}"


def _raise(problems: list[str]) -> None:
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} invalid config values:\n  " + "\n  ".join(problems))


def config_problems(cfg: DictConfig) -> list[str]:
    """One message per value of ``cfg`` that breaks a rule of :data:`RULES`."""
    problems = []
    for key, rule in RULES.items():
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if not isinstance(parent, DictConfig) or leaf not in parent:
            continue
        if OmegaConf.is_missing(parent, leaf):
            continue  # `???`: the code that needs it says that it is required
        value = parent[leaf]
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        allowed = rule(value)
        if allowed is not None:
            problems.append(invalid(key, value, allowed))
    return problems


def check_config(cfg: DictConfig) -> None:
    """Raises :class:`ConfigError` naming every invalid value of a composed ``train.yaml``."""
    _raise(config_problems(cfg))


def _uses_bernoulli(model_cfg: DictConfig) -> str | None:
    """The ``key=value`` that makes the model's likelihood Bernoulli, or None."""
    if model_cfg.get("likelihood") == "bernoulli":
        return "model.likelihood=bernoulli"
    if model_cfg.get("recon_loss") == "bce":
        return "model.recon_loss=bce"
    return None


def check_model_fits_data(
    model_cfg: DictConfig,
    image_shape: Sequence[int],
    value_range: tuple[float, float] | None,
    data_name: str = "the data",
) -> None:
    """Raises :class:`ConfigError` if the model cannot take the data's images.

    Args:
        model_cfg: the ``model`` node of the config.
        image_shape: (C, H, W) of the data's images.
        value_range: (low, high) of the pixel values the model sees; None if unknown.
        data_name: how to call the data in messages (e.g. its class).
    """
    problems = []
    _, height, width = (int(s) for s in image_shape)
    arch = model_cfg.get("arch")
    if arch == "conv" and len(conv_feature_sizes(height, width, max_blocks=1)) < 2:
        problems.append(
            f"model.arch=conv cannot take the {height}x{width} images of {data_name} (shape "
            f"{tuple(image_shape)}): its stride-2 blocks need height and width >= 3; use "
            "model.arch=mlp, or larger images (data.source.image_size where the data has it)"
        )
    bernoulli = _uses_bernoulli(model_cfg)
    if bernoulli and value_range is not None and not 0 <= value_range[0] <= value_range[1] <= 1:
        low, high = value_range
        alternative = (
            "model.likelihood=gaussian"
            if bernoulli.startswith("model.likelihood")
            else "model.recon_loss=mse"
        )
        problems.append(
            f"{bernoulli} needs pixel values in [0, 1], but {data_name} gives values in "
            f"[{low:g}, {high:g}]; use {alternative}, or data scaled to [0, 1]"
        )
    _raise(problems)
