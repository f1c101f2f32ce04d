"""The trackers a run reports to (the ``logger=`` group: TensorBoard, CSV, MLflow, Weights &
Biases, or several): building them, and what they are told about the run beyond its metrics,
its name, the settings that tell it apart (:func:`tracked_hparams`) and its files.

What each tracker shows of one run:

- TensorBoard: scalars (a term in the likelihood's unit tagged with it, ``val/loss
  [squared_error]``: :mod:`vae_experiments.units`), image grids per validation epoch, and the
  HPARAMS tab (the settings, beside the last value of every scalar); the event files are in the
  run directory itself, so the run is named after it under ``--logdir outputs``.
- MLflow: a run named after the run directory in experiment ``vae-experiments`` (tagged as one
  of model training), the settings as params, the metrics, and ``images/*.png`` and
  ``metrics.json`` as artifacts.
- Weights & Biases: a run named after the run directory, the settings as its config, the
  metrics, the final image grids and the test metrics as its summary.
"""

from __future__ import annotations

import logging
from argparse import Namespace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, MLFlowLogger, WandbLogger
from pytorch_lightning.loggers import TensorBoardLogger as LightningTensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from vae_experiments.config_checks import AUTO_LIKELIHOOD, logger_nodes, mlflow_store
from vae_experiments.runs import METRICS_FILE, read_group_choices, tensorboard_dir
from vae_experiments.runs.records import read_overrides
from vae_experiments.targets import instantiate
from vae_experiments.units import LIKELIHOOD_KEY, likelihood_unit, unit_tag

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
    "model.dataset_size",  # from the data (β-TCVAE)
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "trainer.benchmark",
    "trainer.use_distributed_sampler",
)
#: Config groups that are no hyperparameter.
NOT_HPARAM_GROUPS = ("logger",)


#: MLflow's experiment tag for what kind of work an experiment holds, and its value for training
#: models, read by MLflow 3 UIs that choose an experiment's view by its kind (newer ones open on
#: their GenAI view whatever it says: README, MLflow).
MLFLOW_EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoard logger, with what a comparison of runs needs:

    - the ``epoch`` value Lightning adds to every logged set filed as ``trainer/epoch``:
      TensorBoard sorts its cards by name, and a bare ``epoch`` card would open the Scalars tab
      ahead of the loss terms (``test/``, ``train/``, ``val/``);
    - a term in the unit of the run's likelihood tagged with that unit (``val/loss
      [squared_error]``, ``val/loss [discretized_logistic]``; ``unit``, set by
      :func:`build_loggers`): an autoencoder's squared error and a VAE's nats get a chart each;
    - hyperparameters as the HPARAMS tab's session of this run only (its settings), without
      the experiment summary Lightning writes with them: with none, TensorBoard builds the
      table's columns from the sessions of every run it shows, marks the settings whose values
      differ between them, puts those first and ticks them. Nor does it log the metrics again at
      step 0 (a lone point at step 0 where TensorBoard keeps one point per step): the HPARAMS
      tab shows each scalar's last value, the test metrics among them;
    - no ``hparams.yaml`` beside the events: ``config.yaml`` holds the whole config.
    """

    #: The unit of the run's likelihood (:func:`~vae_experiments.units.likelihood_unit`).
    unit: str = ""
    #: The step of the latest metrics logged.
    last_step: int | None = None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        metrics = {
            "trainer/epoch" if key == "epoch" else unit_tag(key, self.unit): value
            for key, value in metrics.items()
        }
        self.last_step = step if step is not None else self.last_step
        super().log_metrics(metrics, step)

    @rank_zero_only
    def log_hyperparams(
        self, params: dict[str, Any], metrics: dict[str, Any] | None = None, step: int | None = None
    ) -> None:
        """Writes ``params`` as this run's HPARAMS session (nested ones flattened, values that
        are no scalar as text); ``metrics`` (Lightning's interface; :func:`report_run` gives
        none) are logged as scalars at ``step``, by default the step of the latest metrics, not
        at step 0."""
        from torch.utils.tensorboard.summary import hparams

        params = flat_config(vars(params) if isinstance(params, Namespace) else dict(params))
        self.hparams.update(params)
        if metrics:
            self.log_metrics(metrics, step if step is not None else self.last_step)
        if not params:  # Lightning's call at the start, for a module without saved ones
            return
        _, session_start, session_end = hparams(params, {})
        writer = self.experiment._get_file_writer()
        writer.add_summary(session_start)
        writer.add_summary(session_end)

    @rank_zero_only
    def save(self) -> None:
        self.experiment.flush()  # Fabric's save; Lightning's writes hparams.yaml besides


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """The loggers ``cfg.logger`` chooses (:func:`~vae_experiments.config_checks.logger_nodes`),
    each writing under ``run_dir`` and naming its run after the run directory; empty for
    ``logger=none``. TensorBoard writes into
    :func:`~vae_experiments.runs.layout.tensorboard_dir` (its run's name is the folder's path),
    its tags in the unit of ``cfg``'s likelihood.

    MLflow's store: a relative ``sqlite:///`` path is taken from the working directory
    (:func:`~vae_experiments.config_checks.mlflow_store`), and the database's folder is created
    (MLflow's SQLite creates no folders); a relative ``artifact_location`` is taken from the
    working directory too.
    """
    loggers = []
    for key, node in logger_nodes(cfg).items():
        target = str(node["_target_"]).rpartition(".")[2]
        if target == "MLFlowLogger":
            node.setdefault("run_name", run_dir.name)
            uri = str(node.get("tracking_uri") or "")
            store = mlflow_store(uri)  # checked for writing before training (config_checks)
            if uri.startswith("sqlite:") and store is not None:
                database = store[0].resolve()
                database.parent.mkdir(parents=True, exist_ok=True)
                query = uri.partition("?")[1:]  # ("?", "mode=ro") or ("", "")
                node["tracking_uri"] = f"sqlite:///{database}{''.join(query)}"
            if node.get("artifact_location") and "://" not in str(node["artifact_location"]):
                node["artifact_location"] = Path(node["artifact_location"]).resolve().as_uri()
        elif target == "WandbLogger":
            node.setdefault("name", run_dir.name)
        save_dir = run_dir
        if target == "TensorBoardLogger":
            save_dir = tensorboard_dir(run_dir)
            # The events go straight into save_dir; the config of a run made before says
            # name: tensorboard, and tensorboard_dir already is that folder.
            node.update(name="", version="")
        # save_dir: config_checks.LOGGER_ARGUMENTS, what the early check expects to be given
        logger = instantiate(node, key=key, save_dir=str(save_dir))
        if isinstance(logger, TensorBoardLogger):
            logger.unit = likelihood_unit(OmegaConf.select(cfg, LIKELIHOOD_KEY))
        loggers.append(logger)
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
    (``model: linear_ae``, ``model/network: mlp``; ``model/likelihood: auto`` as the likelihood
    it chose, ``discretized_logistic``), the model, data, optimizer, scheduler and
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
    if hparams.get("model/likelihood") == AUTO_LIKELIHOOD:  # what the data called for
        hparams["model/likelihood"] = likelihood_unit(OmegaConf.select(cfg, LIKELIHOOD_KEY))
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
    :func:`tracked_hparams`, beside the scalars already logged; MLflow's params and W&B's
    config: those and the whole flattened config), and for MLflow and W&B its image grids and
    ``metrics.json``, MLflow's experiment tagged as one of model training
    (:data:`MLFLOW_EXPERIMENT_KIND`, unless it has a kind); then closes it."""
    hparams = run_hparams(cfg, run_dir)
    # Trackers with a search over params get the whole config (flattened) besides; TensorBoard's
    # HPARAMS table, one column a key, only the settings that matter.
    container = OmegaConf.to_container(cfg, resolve=True)
    whole = {**hparams, **flat_config({k: v for k, v in container.items() if k != "hydra"})}
    images = sorted((run_dir / "images").glob("*.png"))
    for logger in loggers:
        logger.log_hyperparams(hparams if isinstance(logger, TensorBoardLogger) else whole)
        if isinstance(logger, MLFlowLogger):
            mark_as_training(logger)
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


def mark_as_training(logger: MLFlowLogger) -> None:
    """Tags the MLflow experiment of ``logger``'s run as one of model training
    (:data:`MLFLOW_EXPERIMENT_KIND`), unless it already has a kind (chosen in MLflow's UI)."""
    client, key_value = logger.experiment, MLFLOW_EXPERIMENT_KIND
    experiment = client.get_experiment(logger.experiment_id)
    if key_value[0] not in experiment.tags:
        client.set_experiment_tag(logger.experiment_id, *key_value)
