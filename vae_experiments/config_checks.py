"""Checks of a composed training config, before any data is read or any model is built, and
the choices made from the config and the data's description before them: the likelihood the
data call for (:func:`choose_likelihood`, for ``model/likelihood=auto``) and the number of
classes of a model that needs labels (:func:`supply_num_classes`).

Every message names the key, the bad value and what is allowed, in the form the command line
takes, e.g. ``data.batch_size=0 is invalid: must be an integer >= 1``. A check applies only
where the key exists, so configs of data that lack a key are not affected. The model's values
are checked by the model's constructors (``vae_experiments.models``), which training calls
before any data is read.
"""

from __future__ import annotations

import importlib.util
import logging
import netrc
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from vae_experiments import targets
from vae_experiments.configs import CONFIG_DIR
from vae_experiments.data.images import ImageData, pixel_kind
from vae_experiments.models.likelihoods import BINARY
from vae_experiments.runs.layout import CHECKPOINT_CHOICES
from vae_experiments.targets import ConfigError, raise_all

log = logging.getLogger(__name__)

GRADIENT_CLIP_ALGORITHMS = ("norm", "value")


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


def _metric_key(value: Any) -> str | None:
    if isinstance(value, str) and value.startswith(("val/", "test/")):
        return None
    return "must be a val/ or test/ key of metrics.json, e.g. val/loss or test/elbo"


# key -> rule returning None when the value is allowed, else what is allowed.
RULES: dict[str, Callable[[Any], str | None]] = {
    "seed": _int_at_least(0),
    "optimized_metric": _metric_key,
    "test_ckpt": _one_of(CHECKPOINT_CHOICES),
    "steps_per_group": _int_at_least(1),
    "trainer.max_epochs": _max_epochs,
    # A negative clip value would flip the gradients' sign (torch clips by max_norm / norm).
    "trainer.gradient_clip_val": _optional(_number(0), off="no clipping"),
    "trainer.gradient_clip_algorithm": _one_of(GRADIENT_CLIP_ALGORITHMS),
}


#: ``trainer.accelerator`` values that need a CUDA (or ROCm) device.
GPU_ACCELERATORS = ("gpu", "cuda")


def machine_problems(cfg: DictConfig) -> list[ConfigError]:
    """Settings this machine cannot run: a GPU trainer where torch sees no GPU (Lightning would
    say so only after the data and model are built)."""
    import torch

    accelerator = OmegaConf.select(cfg, "trainer.accelerator", default=None)
    if accelerator in GPU_ACCELERATORS and not torch.cuda.is_available():
        return [
            ConfigError(
                "trainer.accelerator",
                accelerator,
                "torch sees no GPU on this machine; use trainer=cpu, or trainer=default "
                "(accelerator=auto picks a GPU where there is one)",
            )
        ]
    return []


def cpu_processes(cfg: DictConfig) -> int | None:
    """How many CPU processes a distributed trainer will start where torch sees no GPU
    (``trainer=ddp trainer.devices=4`` on a laptop); None when that is not the case."""
    import torch

    trainer = cfg.get("trainer") or {}
    strategy, devices = str(trainer.get("strategy", "auto")), trainer.get("devices", "auto")
    on_cpu = trainer.get("accelerator") == "cpu" or (
        trainer.get("accelerator") == "auto" and not torch.cuda.is_available()
    )
    if strategy.startswith("ddp") and on_cpu and isinstance(devices, int) and devices > 1:
        return devices
    return None


def trains_until_stopped(cfg: DictConfig) -> bool:
    """Whether nothing in ``cfg.trainer`` ends training (``max_epochs=-1`` and no step or time
    limit), so that the run should say so at its start."""
    trainer = cfg.get("trainer") or {}
    return (
        trainer.get("max_epochs") == -1
        and trainer.get("max_steps", -1) in (-1, None)
        and trainer.get("max_time") is None
    )


def config_problems(cfg: DictConfig) -> list[ConfigError]:
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
            problems.append(ConfigError(key, value, allowed))
    return problems


#: The nodes that training builds, with the arguments it passes at build time (the loggers
#: under ``logger`` are found by :func:`logger_nodes`).
BUILT_NODES: dict[str, tuple[str, ...]] = {
    "model": ("image_shape", "num_classes"),  # num_classes: models that need labels only
    "data": (),
    "optimizer": (),
    "scheduler.scheduler": (),
    "trainer": ("logger", "callbacks", "default_root_dir", "plugins"),
}

#: What training passes to every logger: its directory.
LOGGER_ARGUMENTS = ("save_dir",)

#: Nodes whose targets are Lightning's classes: checking them imports Lightning (seconds).
LIGHTNING_NODES = ("logger", "trainer")

#: Trackers outside our required dependencies: the logger class's name -> the package it needs.
#: Both come with ``pip install "vae-experiments[tracking]"``.
TRACKER_PACKAGES = {"MLFlowLogger": "mlflow", "WandbLogger": "wandb"}


def wandb_logged_in() -> bool:
    """Whether Weights & Biases has an API key here (``WANDB_API_KEY`` or ``wandb login``'s
    entry in ``~/.netrc``), so that a run can go online without asking for one."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def logger_nodes(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """The loggers that ``cfg.logger`` configures, key -> node (plain dicts, resolved).

    Each file of the ``logger`` group puts its logger under its own name
    (``logger.tensorboard``, ``logger.mlflow``), so ``logger=[tensorboard,mlflow]`` composes
    both; the config of a run saved before that, one node with a ``_target_`` at ``logger``, is
    read as it is. WandbLogger's ``offline: null`` becomes offline unless an API key is set
    (:func:`wandb_logged_in`), so that a run never waits at a login prompt.
    """
    node = cfg.get("logger")
    if not isinstance(node, DictConfig):
        return {}
    container = targets.to_container(node)
    found = (
        {"logger": container}
        if "_target_" in container
        else {
            f"logger.{name}": value for name, value in container.items() if isinstance(value, dict)
        }
    )
    nodes = {}
    for key, value in found.items():
        if value.get("_target_") is None:
            continue  # logger=none of an earlier run: `_target_: null`
        if str(value["_target_"]).endswith("WandbLogger") and value.get("offline") is None:
            value["offline"] = not wandb_logged_in()
        nodes[key] = value
    return nodes


def tracker_problems(cfg: DictConfig) -> list[ConfigError]:
    """A tracker chosen whose package is not installed (``logger=mlflow`` without mlflow),
    with the command that installs it; found without importing anything."""
    found = []
    for key, node in logger_nodes(cfg).items():
        target = str(node["_target_"])
        package = TRACKER_PACKAGES.get(target.rpartition(".")[2])
        if package is not None and importlib.util.find_spec(package) is None:
            found.append(
                ConfigError(
                    f"{key}._target_",
                    target,
                    f"needs the {package} package, which is not installed; install it with: "
                    f'pip install "vae-experiments[tracking]" (or pip install {package}), or '
                    "choose another logger (logger=tensorboard)",
                )
            )
    return found


def build_problems(cfg: DictConfig, lightning: bool = True) -> list[ConfigError]:
    """What building ``cfg``'s nodes would refuse (a foreign target, an unknown key, a wrong
    type), found without building anything; ``lightning=False`` leaves out the nodes of
    :data:`LIGHTNING_NODES`."""
    found: list[ConfigError] = []
    for key, supplied in BUILT_NODES.items():
        if not lightning and key in LIGHTNING_NODES:
            continue
        node = OmegaConf.select(cfg, key, default=None)
        if isinstance(node, DictConfig) and node.get("_target_") is not None:
            found.extend(targets.problems(node, key, supplied))
    if lightning:
        for key, node in logger_nodes(cfg).items():
            found.extend(targets.problems(node, key, LOGGER_ARGUMENTS))
    return found


def check_config(cfg: DictConfig, lightning: bool = True) -> None:
    """Raises :class:`ConfigError` naming every invalid value of a composed ``train.yaml``:
    the rules above, and every node that training builds checked against its target.

    ``lightning=False``: the trainer and logger nodes are not checked against their classes,
    so that a command line's mistake is reported before Lightning is imported (training checks
    everything again).
    """
    problems = [
        *config_problems(cfg),
        *tracker_problems(cfg),
        *build_problems(cfg, lightning),
        *machine_problems(cfg),
    ]
    raise_all(problems)


#: The ``_target_`` of ``model/likelihood=auto`` (configs/model/likelihood/auto.yaml).
AUTO_LIKELIHOOD = "auto"


def choose_likelihood(cfg: DictConfig) -> str | None:
    """Puts the likelihood the data call for in place of ``model/likelihood=auto``, in ``cfg``.

    ``auto.yaml`` names a likelihood config for each kind of pixels: ``binary`` for binarised
    data (``data.binarize=static|dynamic``), ``eight_bit`` for the rest (every source yields
    8-bit images). That file's contents replace ``cfg.model.likelihood``, so the run's
    ``config.yaml`` names the likelihood trained with.

    Returns:
        The name of the likelihood chosen, or None when ``cfg`` names one itself.
    """
    node = cfg.model.get("likelihood")
    if not isinstance(node, DictConfig) or node.get("_target_") != AUTO_LIKELIHOOD:
        return None
    kind = pixel_kind(cfg.data.get("binarize", "none"))
    key = "binary" if kind == BINARY else "eight_bit"
    name = node.get(key)
    folder = Path(CONFIG_DIR) / "model" / "likelihood"
    if not (isinstance(name, str) and (folder / f"{name}.yaml").is_file()):
        options = sorted(p.stem for p in folder.glob("*.yaml") if p.stem != AUTO_LIKELIHOOD)
        raise ConfigError(f"model.likelihood.{key}", name, f"must be one of {', '.join(options)}")
    with open_dict(cfg):
        cfg.model.likelihood = OmegaConf.load(folder / f"{name}.yaml")
    log.info(
        "model.likelihood: %s, for %s pixels (model/likelihood=auto; model/likelihood=<name> "
        "chooses one)",
        name,
        kind,
    )
    return name


#: Where class labels come from, for the message of a model that needs them.
LABELLED_DATA = (
    "data=digits, data=mnist, data=fashion_mnist, or data=image_folder with a subfolder per class"
)


def supply_num_classes(
    cfg: DictConfig, data: ImageData, choices: dict[str, str] | None = None
) -> int | None:
    """Sets ``cfg.model.num_classes`` to the data's number of classes where the model needs
    labels (its class's ``needs_labels``), as ``model.image_shape`` is set from the data.

    Args:
        cfg: the composed training config.
        data: the run's data (built, not loaded: a folder source lists its folder).
        choices: the config-group choices (``{"model": "cvae", "data": "synthetic"}``), to
            name them in the message; None or missing ones: the targets are named.

    Returns:
        The number of classes, or None for a model that needs no labels.

    Raises:
        ConfigError: the model needs labels and the data have no classes (synthetic images,
            CelebA, a folder without class subfolders), naming both.
    """
    target = cfg.model.get("_target_")
    model_class = targets.resolve_target(target, "model")
    if not getattr(model_class, "needs_labels", False):
        return None
    num_classes = data.num_classes
    if num_classes is None:
        choices = choices or {}
        source = OmegaConf.select(cfg, "data.source._target_", default=None) or data.name
        model = f"model={choices['model']}" if "model" in choices else f"model._target_={target}"
        data_name = (
            f"data={choices['data']}" if "data" in choices else f"data.source._target_={source}"
        )
        raise ConfigError(
            allowed=f"{model} needs class labels (a {model_class.__name__}), and {data_name} has "
            f"none ({data.name} images are unlabelled: every label is 0); train it on labelled "
            f"data ({LABELLED_DATA}), or choose a model without labels (model=vae)"
        )
    with open_dict(cfg):
        cfg.model.num_classes = num_classes
    return num_classes
