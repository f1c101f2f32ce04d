"""Checks of a composed training config, before any data is read or any model is built, and
the choices made from the config and the data's description before them: the likelihood the
data call for (:func:`choose_likelihood`, for ``model/likelihood=auto``) and the model's
arguments that come from the data (:func:`supply_model_args`: the number of classes of a model
that needs labels, the training set's size of one that weights by it).

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
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from vae_experiments import targets
from vae_experiments.configs import CONFIG_DIR
from vae_experiments.configs.old_keys import old_key_message
from vae_experiments.cpu_threads import AUTO as AUTO_THREADS
from vae_experiments.runs.layout import CHECKPOINT_CHOICES
from vae_experiments.targets import ConfigError, raise_all

if TYPE_CHECKING:  # torch: imported where a check needs it
    from vae_experiments.data.images import ImageData

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


def _threads(value: Any) -> str | None:
    if value == AUTO_THREADS or (_is_int(value) and value >= 1):
        return None
    return f"must be {AUTO_THREADS} (the cores this process may use) or an integer >= 1"


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
    "threads": _threads,
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
    # num_classes, dataset_size: models that need them only (supply_model_args)
    "model": ("image_shape", "num_classes", "dataset_size"),
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


#: MLflow tracking URIs without a scheme that name a server, not a folder.
MLFLOW_SERVER_NAMES = ("databricks", "databricks-uc", "uc")

#: What to give instead of an MLflow store that cannot be written.
MLFLOW_STORE_FIX = (
    "give one you can write, e.g. {key}=sqlite:///outputs/mlflow.db (a path from the working "
    "directory; sqlite://// starts an absolute one), or a server: {key}=http://host:5000"
)


def mlflow_store(uri: str | None) -> tuple[Path, bool] | None:
    """Where an MLflow tracking URI keeps its runs on this machine: ``(path, is_file)``.

    ``sqlite:///outputs/mlflow.db`` is a database file, taken from the working directory
    (``sqlite:////abs/mlflow.db``: an absolute path); a plain path or a ``file://`` URI is the
    folder of MLflow's file store. None for a server (``http(s)://``, ``databricks``,
    ``postgresql://``, ...) or an in-memory database: MLflow reaches those itself.
    """
    if not uri:
        return None
    if uri.startswith("sqlite:"):
        database = uri.removeprefix("sqlite:").removeprefix("//").split("?")[0]
        database = database.removeprefix("/")  # sqlite:///a.db -> a.db, sqlite:////a -> /a
        if database in ("", ":memory:"):
            return None
        return Path(database).expanduser().absolute(), True
    if uri in MLFLOW_SERVER_NAMES:
        return None
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            return None
        return Path(url2pathname(parsed.path)).absolute(), False
    if len(parsed.scheme) > 1:  # one letter: a Windows drive
        return None
    return Path(uri).expanduser().absolute(), False


def unwritable_reason(path: Path, is_file: bool) -> str | None:
    """Why ``path`` (a file, or a folder where not ``is_file``) cannot be created or written
    here, or None where it can: a file is opened for writing (and left as it was), and a file
    is created in its folder (or the nearest existing folder above) and removed again.

    Tried rather than read from the permission bits, which say nothing of a read-only file
    system or of root, nor of folders such as ``/proc``.
    """
    folder = path.parent if is_file else path
    try:
        if path.exists():
            if path.is_dir() == is_file:
                kind = "a folder" if is_file else "a file"
                return f"{path} is {kind}, not {'a file' if is_file else 'a folder'}"
            if is_file:
                with path.open("r+b"):
                    pass
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            return f"{folder} is a file, not a folder"
    except OSError as error:
        return f"{error.filename or path} cannot be written ({error.strerror or error})"
    try:  # SQLite writes its journal beside the database: the folder must take new files
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return f"no file can be created in {folder} ({error.strerror or error})"
    return None


def tracker_store_problems(cfg: DictConfig) -> list[ConfigError]:
    """An MLflow store on this machine that cannot be written (a read-only folder, a path
    through a file): MLflow would retry for minutes and fail with a traceback that names
    neither the key nor the path. A server's URI is left to MLflow; nothing is imported."""
    found = []
    for key, node in logger_nodes(cfg).items():
        if not str(node["_target_"]).endswith("MLFlowLogger"):
            continue
        uri = node.get("tracking_uri")
        store = mlflow_store(str(uri) if uri else None)
        if store is not None:
            path, is_file = store
            reason = unwritable_reason(path, is_file)
            if reason is not None:
                what = "database" if is_file else "store folder"
                source = (
                    " (it comes from $MLFLOW_TRACKING_URI)"
                    if os.environ.get("MLFLOW_TRACKING_URI") == uri
                    else ""
                )
                found.append(
                    ConfigError(
                        f"{key}.tracking_uri",
                        uri,
                        f"MLflow's {what} {path} cannot be written here: {reason}{source}; "
                        + MLFLOW_STORE_FIX.format(key=f"{key}.tracking_uri"),
                    )
                )
        location = node.get("artifact_location")
        if location and ("://" not in str(location) or str(location).startswith("file:")):
            folder = mlflow_store(str(location))
            reason = None if folder is None else unwritable_reason(folder[0], False)
            if folder is not None and reason is not None:
                found.append(
                    ConfigError(
                        f"{key}.artifact_location",
                        location,
                        f"the folder for MLflow's artifacts {folder[0]} cannot be written here: "
                        f"{reason}; give one you can write, e.g. {key}.artifact_location="
                        "outputs/mlartifacts (a path from the working directory)",
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
    return [_as_old_key(problem, cfg) for problem in found]


def _as_old_key(problem: ConfigError, cfg: DictConfig) -> ConfigError:
    """``problem`` about a key of the old flat configs (``+data.image_size=64``, which Hydra's
    own message advises for ``data.image_size=64``) said as what replaced the key, else as
    it is."""
    value = OmegaConf.select(cfg, problem.key, default=None) if problem.key else None
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value)
    typed = targets.format_value(value).replace(", ", ",")  # [8,16], as a command line has it
    message = problem.key and old_key_message(problem.key, typed, cfg)
    return ConfigError(allowed=message) if message else problem


def check_values(cfg: DictConfig) -> None:
    """Raises :class:`ConfigError` naming every value of :data:`RULES` that is invalid, and a
    tracker whose package is missing or whose store cannot be written: the checks that import
    nothing (no torch), so that a command line's mistake among them fails in a fraction of a
    second."""
    raise_all([*config_problems(cfg), *tracker_problems(cfg), *tracker_store_problems(cfg)])


def build_lr_scheduler(cfg: DictConfig | None) -> dict[str, Any] | None:
    """The ``scheduler=`` group as Lightning's lr-scheduler dict, its ``scheduler`` a partial
    taking the optimizer; None for ``scheduler=none``."""
    if not cfg or cfg.get("scheduler") is None:
        return None
    config = dict(targets.to_container(cfg))
    config["scheduler"] = targets.instantiate(cfg.scheduler, key="scheduler.scheduler")
    return config


def check_optimizer(
    model: Any, optimizer: Callable[..., Any], lr_scheduler: dict[str, Any] | None
) -> None:
    """Builds the optimizer (and scheduler) once on the model's parameters and drops them, so
    that a value torch refuses (``optimizer.lr=-1``) fails before any data is read."""
    trial = optimizer(model.parameters())
    if lr_scheduler is not None:
        lr_scheduler["scheduler"](trial)


def check_by_building(cfg: DictConfig, choices: dict[str, str] | None = None) -> None:
    """Builds what training builds before it reads any data (the data object, the model, the
    optimizer and its schedule) once, and drops it, so that a value a constructor refuses
    (``model.latent_dim=0``, ``data.batch_size=0``, ``optimizer.lr=-1``) fails before Lightning
    is imported. The model is built on torch's meta device: its constructors check their values,
    but no weights are allocated or initialised, so this costs milliseconds whatever its size.

    Args:
        cfg: the composed training config.
        choices: its config-group choices, to name them in a message (:func:`supply_model_args`).

    Raises:
        ConfigError: what a constructor refused, naming the key; a model that needs labels on
            data without classes.
    """
    import torch

    from vae_experiments.runs.load import build_model

    try:
        data = targets.instantiate(cfg.data, key="data")
        model_cfg = OmegaConf.create({"model": targets.to_container(cfg.model)})
        model_cfg.model.image_shape = [int(size) for size in data.image_shape]
        supply_model_args(model_cfg, data, choices)  # as training does, from the data
        with torch.device("meta"):
            model = build_model(model_cfg)
        optimizer = targets.instantiate(cfg.optimizer, key="optimizer")
        check_optimizer(model, optimizer, build_lr_scheduler(cfg.get("scheduler")))
    except ConfigError:
        raise
    except Exception as error:  # e.g. what the meta device cannot do: training builds for real
        log.debug("the config's parts were not built on the meta device: %s", error)


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
        *tracker_store_problems(cfg),
        *build_problems(cfg, lightning),
        *adversary_problems(cfg),
        *fused_optimizer_problems(cfg),
        *machine_problems(cfg),
    ]
    raise_all(problems)


def fused_optimizer_problems(cfg: DictConfig) -> list[ConfigError]:
    """``optimizer.fused=true`` with gradient clipping under mixed precision: Lightning refuses
    to clip the gradients of an optimizer that unscales them itself, after the run started.
    (``optimizer.fused=null``, the default, chooses the unfused implementation there.)"""
    fused = OmegaConf.select(cfg, "optimizer.fused", default=None)
    clip = OmegaConf.select(cfg, "trainer.gradient_clip_val", default=None)
    precision = str(OmegaConf.select(cfg, "trainer.precision", default="32-true"))
    if fused is True and clip and precision.endswith("-mixed"):
        return [
            ConfigError(
                "optimizer.fused",
                fused,
                f"cannot go with trainer.gradient_clip_val={clip} under "
                f"trainer.precision={precision}: Lightning does not clip the gradients of a "
                "fused optimizer in mixed precision. Use optimizer.fused=null (fused where it "
                "can be) or trainer.gradient_clip_val=null",
            )
        ]
    return []


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
    from vae_experiments.data.images import pixel_kind  # torch: only for model/likelihood=auto
    from vae_experiments.models.likelihoods import BINARY

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
        if data.factor_names is not None:
            why = f"its labels are factors ({', '.join(data.factor_names)}), not classes"
        else:
            why = f"{data.name} images are unlabelled: every label is 0"
        raise ConfigError(
            allowed=f"{model} needs class labels (a {model_class.__name__}), and {data_name} has "
            f"none ({why}); train it on labelled "
            f"data ({LABELLED_DATA}), or choose a model without labels (model=vae)"
        )
    with open_dict(cfg):
        cfg.model.num_classes = num_classes
    return num_classes


#: What stands in for the training set's size where a model is built before the data is read
#: (:func:`check_by_building`, on the meta device): it shifts only logged terms by constants.
DATASET_SIZE_UNREAD = 1


def supply_model_args(
    cfg: DictConfig, data: ImageData, choices: dict[str, str] | None = None
) -> dict[str, int]:
    """Sets the model's arguments that come from the data, as ``model.image_shape`` is: the one
    owner of them.

    - ``model.num_classes`` where the model needs labels (:func:`supply_num_classes`);
    - ``model.dataset_size``, the training split's size, where the model's class sets
      ``needs_dataset_size`` (β-TCVAE's minibatch-weighted sampling). Known once the data is
      loaded (``data.setup()``); before (the config checks), :data:`DATASET_SIZE_UNREAD`
      stands in.

    Returns:
        The arguments set, by name (empty for a model that needs none).

    Raises:
        ConfigError: as :func:`supply_num_classes`.
    """
    supplied = {}
    num_classes = supply_num_classes(cfg, data, choices)
    if num_classes is not None:
        supplied["num_classes"] = num_classes
    model_class = targets.resolve_target(cfg.model.get("_target_"), "model")
    if getattr(model_class, "needs_dataset_size", False):
        splits = data.splits
        size = DATASET_SIZE_UNREAD if splits is None else len(splits["train"])
        with open_dict(cfg):
            cfg.model.dataset_size = size
        supplied["dataset_size"] = size
    return supplied


#: Why a model with an adversary (a second optimizer) trains with fewer of the trainer's options.
ADVERSARY_REASON = (
    "steps its two optimizers itself, in its training step (Lightning's manual optimization)"
)


def adversary_problems(cfg: DictConfig) -> list[ConfigError]:
    """The settings a model with an adversary cannot train with (FactorVAE: ``has_adversary``,
    :mod:`vae_experiments.models.adversary`), each with what to use instead: an lr scheduler,
    gradient clipping, gradient accumulation, a gradient scaler (16-bit precision), an
    optimizer that needs a closure (L-BFGS); and batches smaller than the model's
    ``min_batch_size``. Found without building."""
    target = OmegaConf.select(cfg, "model._target_", default=None)
    if not isinstance(target, str):
        return []
    try:
        model_class = targets.resolve_target(target, "model")
    except ConfigError:
        return []  # build_problems names it
    model = model_class.__name__
    found = []
    least = getattr(model_class, "min_batch_size", None)  # with min_batch_reason
    batch_size = OmegaConf.select(cfg, "data.batch_size", default=None)
    if least is not None and _is_int(batch_size) and batch_size < least:
        found.append(
            ConfigError(
                "data.batch_size",
                batch_size,
                f"must be >= {least} for {model}: {model_class.min_batch_reason}",
            )
        )
    if not getattr(model_class, "has_adversary", False):
        return found
    because = f"{model} has an adversary and {ADVERSARY_REASON}"
    scheduler = OmegaConf.select(cfg, "scheduler.scheduler._target_", default=None)
    if scheduler is not None:
        found.append(
            ConfigError(
                "scheduler.scheduler._target_",
                scheduler,
                f"{because} and takes no lr schedule: use scheduler=none",
            )
        )
    clip = OmegaConf.select(cfg, "trainer.gradient_clip_val", default=None)
    if clip:
        found.append(
            ConfigError(
                "trainer.gradient_clip_val",
                clip,
                f"{because} and clips no gradients: use trainer.gradient_clip_val=null",
            )
        )
    accumulate = OmegaConf.select(cfg, "trainer.accumulate_grad_batches", default=1)
    if accumulate not in (None, 1):
        found.append(
            ConfigError(
                "trainer.accumulate_grad_batches",
                accumulate,
                f"{because} and accumulates no gradients: use trainer.accumulate_grad_batches=1",
            )
        )
    precision = str(OmegaConf.select(cfg, "trainer.precision", default="32-true"))
    if precision in ("16-mixed", "16"):
        found.append(
            ConfigError(
                "trainer.precision",
                precision,
                f"{because}, without a gradient scaler: use trainer.precision=bf16-mixed or "
                "32-true",
            )
        )
    optimizer = str(OmegaConf.select(cfg, "optimizer._target_", default=""))
    if optimizer.endswith("LBFGS"):
        found.append(
            ConfigError(
                "optimizer._target_",
                optimizer,
                f"{because}, one step per batch, and L-BFGS evaluates the loss itself: use "
                "optimizer=adam",
            )
        )
    return found
