"""The trackers a run reports to (the ``logger=`` group: TensorBoard, CSV, MLflow, Weights &
Biases, or several): building them, and what they are told about the run beyond its metrics,
its name, the settings that tell it apart (:func:`tracked_hparams`) and its files.

What each tracker shows of one run:

- TensorBoard: scalars, image grids per validation epoch, and the HPARAMS tab (the settings
  with the test metrics); the run is its directory under ``--logdir outputs``.
- MLflow: a run named after the run directory in experiment ``vae-experiments``, the settings as
  params, the metrics, and ``images/*.png`` and ``metrics.json`` as artifacts.
- Weights & Biases: a run named after the run directory, the settings as its config, the
  metrics, the final image grids and the test metrics as its summary.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, MLFlowLogger, WandbLogger
from pytorch_lightning.loggers import TensorBoardLogger as LightningTensorBoardLogger

from vae_experiments.config_checks import logger_nodes
from vae_experiments.runs import METRICS_FILE, read_group_choices
from vae_experiments.runs.records import read_overrides
from vae_experiments.targets import instantiate

log = logging.getLogger(__name__)

#: Config sections whose keys are the run's hyperparameters.
HPARAM_SECTIONS = ("seed", "model", "data", "optimizer", "scheduler", "trainer")
#: Keys of those sections that change how a run runs or looks, not what it learns.
NOT_HPARAMS = (
    "data.num_workers",
    "data.on_device",
    "data.seed",  # the run's seed, shown as `seed`
    "model.image_shape",  # from the data
    "model.num_classes",  # from the data
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "trainer.benchmark",
    "trainer.use_distributed_sampler",
)
#: Config groups that are no hyperparameter.
NOT_HPARAM_GROUPS = ("logger",)


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoard logger, with the ``epoch`` value Lightning adds to every logged
    set filed as ``trainer/epoch``: TensorBoard sorts its cards by name, and a bare ``epoch``
    card would open the Scalars tab ahead of the loss terms (``test/``, ``train/``, ``val/``)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "epoch" in metrics:
            metrics = {("trainer/epoch" if k == "epoch" else k): v for k, v in metrics.items()}
        super().log_metrics(metrics, step)


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """The loggers ``cfg.logger`` chooses (:func:`~vae_experiments.config_checks.logger_nodes`),
    each writing under ``run_dir`` and naming its run after the run directory; empty for
    ``logger=none``.

    MLflow's store: a relative ``sqlite:///`` path is taken from the working directory (its
    folder is created), as is a relative ``artifact_location``.
    """
    loggers = []
    for key, node in logger_nodes(cfg).items():
        target = str(node["_target_"]).rpartition(".")[2]
        if target == "MLFlowLogger":
            node.setdefault("run_name", run_dir.name)
            uri = str(node.get("tracking_uri") or "")
            if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
                database = Path(uri.removeprefix("sqlite:///")).resolve()
                database.parent.mkdir(parents=True, exist_ok=True)
                node["tracking_uri"] = f"sqlite:///{database}"
            if node.get("artifact_location") and "://" not in str(node["artifact_location"]):
                node["artifact_location"] = Path(node["artifact_location"]).resolve().as_uri()
        elif target == "WandbLogger":
            node.setdefault("name", run_dir.name)
        # save_dir: config_checks.LOGGER_ARGUMENTS, what the early check expects to be given
        loggers.append(instantiate(node, key=key, save_dir=str(run_dir)))
    return loggers


def flat_config(node: Any, prefix: str = "") -> dict[str, Any]:
    """A config as ``{"model.latent_dim": 16, ...}`` with scalar values (lists and null as their
    text)."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    flat: dict[str, Any] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            flat.update(flat_config(value, f"{prefix}{key}."))
    else:
        is_scalar = isinstance(node, int | float | str | bool)  # null too becomes text: a column
        flat[prefix[:-1]] = node if is_scalar else str(node)
    return flat


def tracked_hparams(
    cfg: DictConfig, choices: dict[str, str], overrides: dict[str, Any]
) -> dict[str, Any]:
    """The settings that tell runs apart, as trackers' hyperparameters: the config-group choices
    (``model: linear_ae``, ``model/network: mlp``), the model, data, optimizer, scheduler and
    trainer keys and the seed, and every key overridden on the command line; not the builders'
    ``_target_`` (the choice names the option), nor settings that do not change what is learnt
    (:data:`NOT_HPARAMS`) or the callbacks' constants.

    Args:
        cfg: the run's config.
        choices: its config-group choices (``.hydra/hydra.yaml``; empty outside Hydra).
        overrides: its command line's overrides (``.hydra/overrides.yaml``).

    Returns:
        Key -> scalar value, choices first, then the config keys in order.
    """
    container = OmegaConf.to_container(cfg, resolve=True)
    hparams: dict[str, Any] = {
        group: choice
        for group, choice in choices.items()
        if group.split("/")[0] not in NOT_HPARAM_GROUPS
    }
    flat = flat_config({k: v for k, v in container.items() if k != "hydra"})
    overridden = set(overrides)
    for key, value in flat.items():
        section = key.split(".")[0]
        leaf = key.rpartition(".")[2]
        if key in overridden or (
            section in HPARAM_SECTIONS
            and key not in NOT_HPARAMS
            and leaf not in ("_target_", "_partial_")
        ):
            hparams.setdefault(key, value)
    return hparams


def run_hparams(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """:func:`tracked_hparams` of the run in ``run_dir`` (its choices and overrides as Hydra
    recorded them there)."""
    return tracked_hparams(cfg, read_group_choices(run_dir), read_overrides(run_dir))


def report_run(
    loggers: list[Logger], cfg: DictConfig, run_dir: Path, metrics: dict[str, float]
) -> None:
    """Tells each tracker about the finished run: its settings (TensorBoard's HPARAMS: those of
    :func:`tracked_hparams`, with the test metrics; MLflow's params and W&B's config: those and
    the whole flattened config), and for MLflow and W&B its image grids and ``metrics.json``;
    then closes it."""
    hparams = run_hparams(cfg, run_dir)
    # Trackers with a search over params get the whole config (flattened) besides; TensorBoard's
    # HPARAMS table, one column a key, only the settings that matter.
    container = OmegaConf.to_container(cfg, resolve=True)
    whole = {**hparams, **flat_config({k: v for k, v in container.items() if k != "hydra"})}
    test_metrics = {k: v for k, v in metrics.items() if k.startswith("test/")}
    images = sorted((run_dir / "images").glob("*.png"))
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(hparams, metrics=test_metrics)
        else:
            logger.log_hyperparams(whole)
        if isinstance(logger, MLFlowLogger):
            for path in [*images, run_dir / METRICS_FILE]:
                artifact_dir = "images" if path.suffix == ".png" else None
                logger.experiment.log_artifact(logger.run_id, str(path), artifact_dir)
        elif isinstance(logger, WandbLogger):
            for path in images:
                logger.log_image(f"images/{path.stem}", [str(path)])
            logger.experiment.summary.update(metrics)
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # writes the summary and config; Lightning leaves it open
