"""Keys of the old flat configs, and what a user types instead of each.

The model once had flat keys (``model.arch=mlp``, ``model.learn_sigma=true``); its parts are now
chosen by config groups (``model/network=mlp``). The data once had flat keys too
(``data.image_size=64``, ``data.data_dir=...``); each data source now has the keys it reads under
``data.source`` (``data.source.image_size``), and data that has no such setting has none (the
digits' size is 8x8: the images say so). :func:`old_key_message` says, for a key that is no
longer in the config, what replaced it: the command line's "did you mean" suggestions
(``cli/did_you_mean.py``) and the check of a node's parameters (``+data.image_size=64``, as
Hydra's own message advises, reaches ``config_checks``) both ask it.

Plain Python and OmegaConf: no torch, so a mistake is answered fast.
"""

from __future__ import annotations

import functools
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vae_experiments.configs import CONFIG_DIR

#: Keys of the flat model configs that model parts chosen by config groups replaced: old key ->
#: what to type now, with ``{value}`` for the value typed. A dict maps old values one by one.
RENAMED_KEYS: dict[str, str | dict[str, str]] = {
    "model.arch": "model/network={value}",
    "model.hidden_dims": "model/network=mlp model.network.hidden_dims={value}",
    "model.conv_channels": "model/network=conv model.network.channels={value}",
    "model.recon_loss": {
        "mse": "model/likelihood=squared_error",
        "bce": "model/likelihood=bernoulli",
    },
    "model.sigma": "model/likelihood=gaussian model.likelihood.sigma={value}",
    "model.learn_sigma": "model/likelihood=gaussian model.likelihood.learn_sigma={value}",
    "model.min_sigma": "model/likelihood=gaussian model.likelihood.min_sigma={value}",
    "model.noise.kind": {
        "gaussian": "model/corruption=gaussian_noise",
        "mask": "model/corruption=mask",
    },
    "model.noise.std": "model/corruption=gaussian_noise model.corruption.std={value}",
    "model.noise.p": "model/corruption=mask model.corruption.p={value}",
}

#: Old flat data keys that the images decide where a source has no setting for them: why, and
#: the source key that sets them in generated data (``data=synthetic``).
FROM_THE_IMAGES: dict[str, tuple[str, str]] = {
    "image_size": ("the image size comes from its files", "image_shape"),
    "channels": ("the channels come from its files", "image_shape"),
}


def renamed_key_message(key: str, value: str) -> str | None:
    """What replaced ``key=value`` of an old flat model config (:data:`RENAMED_KEYS`), or None."""
    replacement = RENAMED_KEYS.get(key)
    if isinstance(replacement, dict):
        replacement = replacement.get(value, " or ".join(replacement.values()))
    if replacement is None:
        return None
    return f"{key} is no longer a config key: use `{replacement.format(value=value)}`"


@functools.cache
def data_sources() -> dict[str, tuple[str, frozenset[str]]]:
    """Each shipped ``data=`` option -> (its source's ``_target_``, the keys of its source),
    read from ``configs/data/*.yaml``."""
    sources = {}
    for path in sorted((Path(CONFIG_DIR) / "data").glob("*.yaml")):
        source = OmegaConf.load(path).get("source")
        if isinstance(source, DictConfig):
            sources[path.stem] = (str(source.get("_target_")), frozenset(map(str, source)))
    return sources


def _options(names: list[str]) -> str:
    """``data=a``, ``data=a or data=b``, ``data=a, data=b or data=c``."""
    choices = [f"data={name}" for name in names]
    return " or ".join([", ".join(choices[:-1]), choices[-1]] if len(choices) > 1 else choices)


def moved_data_key_message(key: str, value: str, source: dict | DictConfig | None) -> str | None:
    """What replaced ``key=value``, a key of the old flat data configs (``data.image_size``),
    given the chosen data's ``source`` node; None for a key that no data source has.

    Where the chosen source has the key: ``use `data.source.image_size=64```. Where it has not:
    which ``data=`` options have it, and that the chosen one has no such setting (and why: the
    digits' size comes from their files).
    """
    parent, _, leaf = key.partition(".")
    if parent != "data" or not leaf or "." in leaf:
        return None
    sources = data_sources()
    having = [name for name, (_, keys) in sources.items() if leaf in keys]
    if not having:
        return None
    source_keys = set(map(str, source)) if source is not None else set()
    if leaf in source_keys:
        return f"{key} is no longer a config key: use `data.source.{leaf}={value}`"
    target = str(source.get("_target_")) if source is not None else ""
    chosen = next((name for name, (t, _) in sources.items() if t == target), None)
    this = f"data={chosen}" if chosen else "this data"
    why, generated = FROM_THE_IMAGES.get(leaf, ("", ""))
    if generated and generated in source_keys:
        return (
            f"{key} is no longer a config key: {this} makes images of the shape "
            f"data.source.{generated}=[channels,height,width]; data.source.{leaf} is a key of "
            f"{_options(having)}"
        )
    where = f"it is data.source.{leaf} with {_options(having)}"
    makers = [name for name, (_, keys) in sources.items() if generated and generated in keys]
    if makers:
        where += f", data.source.{generated} with {_options(makers)}"
    return f"{key} is no longer a config key: {where}; {this} has no such setting" + (
        f" ({why})" if why else ""
    )


def old_key_message(key: str, value: str, config: dict | DictConfig) -> str | None:
    """What replaced ``key=value`` of an old flat model or data config, given the composed
    ``config`` (``train.yaml``'s; a plain dict or a DictConfig); None for any other key."""
    data = config.get("data") if config is not None else None
    source = data.get("source") if isinstance(data, dict | DictConfig) else None
    return renamed_key_message(key, value) or moved_data_key_message(
        key, value, source if isinstance(source, dict | DictConfig) else None
    )
