"""``python train.py -m hydra/sweeper=optuna 'model.beta=interval(0.5,8)' ...``: a search over
hyperparameters with Optuna, as a Hydra sweeper.

Hydra's own optuna sweeper plugin (``hydra-optuna-sweeper`` 1.2/1.3) pins ``optuna<3``, whose
SQLite storage fails on SQLAlchemy 2 (which MLflow's database needs), so an interrupted search
could not resume; this sweeper takes the same command line and uses Optuna (>= 3) directly.

Each argument of the command line is either searched or fixed:

- ``key=interval(a,b)``: a number in [a, b] (``int(interval(a,b))``: an integer), ``tag(log,
  interval(a,b))`` on a log scale;
- ``key=a,b,c`` or ``key=choice(a,b,c)``: one of the values (config groups too: ``model=ae,vae``);
- ``key=range(a,b,step)``: an integer from ``a`` up to (not including) ``b``;
- anything else is passed to every trial as it is.

A trial is one training run (a job of the sweep, in ``<sweep dir>/<trial number>-...``); its
value is what the task returns, the run's ``optimized_metric`` (``train.yaml``). A trial that
fails is recorded as failed (its run's ``status.json`` says why) and the search goes on. The
search is written to ``<sweep dir>/search.yaml`` after every batch of trials
(:data:`~vae_experiments.runs.layout.SEARCH_FILE`); ``python scripts/summarize.py <sweep dir>``
ranks its trials. With ``hydra.sweeper.storage=sqlite:///search.db`` the study outlives the
command: the same command line again runs only the trials still missing.

Hydra builds sweepers only from classes defined in the ``hydra_plugins`` package, so
``hydra_plugins/vae_experiments_search`` defines the Sweeper on :class:`OptunaSearch`; Optuna is imported when a search
starts, so Hydra's scan of its plugins does not need it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from vae_experiments.runs.layout import SEARCH_FILE, metric_direction
from vae_experiments.targets import ConfigError

log = logging.getLogger(__name__)

#: ``hydra.sweeper.direction``: ``auto`` follows the metric (maximise ``val/elbo``, minimise
#: ``val/loss``: :func:`~vae_experiments.runs.layout.metric_direction`).
AUTO = "auto"
DIRECTIONS = (AUTO, "minimize", "maximize")
SAMPLERS = ("tpe", "random")
#: Searched keys that change what ``loss`` measures, not only how good a model is: beta weights
#: the KL term in it, and with k > 1 it is minus the k-sample bound, which grows with k.
LOSS_CHANGING_KEYS = ("model.beta", "model.k")


def objective(metric: str | None, direction: str, searched: Sequence[str]) -> tuple[str, list[str]]:
    """The direction in which a search optimises ``metric`` (``optimized_metric``), and
    warnings about choosing trials by it.

    Args:
        metric: ``optimized_metric``; None for train.yaml's default, ``val/loss``.
        direction: ``hydra.sweeper.direction``: ``auto`` (the metric's own), or ``minimize`` /
            ``maximize``.
        searched: the searched keys (``model.beta``).

    Returns:
        (``minimize`` or ``maximize``, the warnings to log).

    Raises:
        ConfigError: for a direction against the metric's (``minimize`` of ``val/elbo``).
    """
    metric = metric or "val/loss"
    term = metric.rpartition("/")[2]
    own = metric_direction(metric)
    warnings = []
    if direction == AUTO:
        direction = own or "minimize"
        if own is None:
            warnings.append(
                f"which way optimized_metric={metric} is better is not known here: the search "
                "minimises it; set hydra.sweeper.direction=maximize if higher is better"
            )
    elif own is not None and direction != own:
        better = "higher" if own == "maximize" else "lower"
        raise ConfigError(
            "hydra.sweeper.direction",
            direction,
            f"{metric} is better {better}: use {own}, or leave hydra.sweeper.direction out "
            "(auto follows the metric)",
        )
    if metric.startswith("test/"):
        warnings.append(
            f"optimized_metric={metric} chooses trials on the test split: the best trial's "
            f"{metric} is then tuned to the test images and overstates how the model does on "
            f"new ones. Search on a validation metric (optimized_metric=val/{term}) and report "
            f"the chosen run's {metric}"
        )
    changing = [key for key in searched if key in LOSS_CHANGING_KEYS]
    if term == "loss" and changing:
        warnings.append(
            f"optimized_metric={metric} changes with the searched {' and '.join(changing)} "
            "itself (model.beta weights the KL term in the loss; with model.k > 1 it is minus "
            "the k-sample bound), so the search favours the values that make the number small, "
            "not the best model. Search on val/elbo (maximised), the same ELBO whatever their "
            "values"
        )
    return direction, warnings


def searched_keys(arguments: Sequence[str]) -> list[str]:
    """The keys that the command line searches (``model.beta=interval(0.5,8)``), in order."""
    overrides = OverridesParser.create().parse_overrides(list(arguments))
    return [o.get_key_element() for o in overrides if o.is_sweep_override()]


def distribution(override: Override) -> Any:
    """The Optuna distribution of one searched command-line argument.

    Raises:
        ConfigError: for a sweep Optuna cannot search (naming the argument).
    """
    import optuna.distributions as od

    value = override.value()
    key = override.get_key_element()
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return od.IntDistribution(value.start, value.end, log=log_scale)
        return od.FloatDistribution(float(value.start), float(value.end), log=log_scale)
    if isinstance(value, RangeSweep) and all(
        isinstance(v, int) for v in (value.start, value.stop, value.step)
    ):
        last = value.stop - 1 - (value.stop - 1 - value.start) % value.step
        return od.IntDistribution(value.start, last, step=value.step)
    if isinstance(value, ChoiceSweep | RangeSweep):
        return od.CategoricalDistribution(list(override.sweep_string_iterator()))
    raise ConfigError(
        key,
        allowed=f"{override.input_line}: not a sweep Optuna can search; use interval(a,b), "
        "tag(log, interval(a,b)), choice(a,b,...) or range(a,b,step)",
    )


def split_arguments(arguments: Sequence[str]) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """The searched arguments (key -> distribution, in order), the fixed ones (as typed), and
    the searched ones as typed (key -> ``interval(0.5,8)``)."""
    searched, fixed, typed = {}, [], {}
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        if override.is_sweep_override():
            searched[override.get_key_element()] = distribution(override)
            typed[override.get_key_element()] = override.input_line.partition("=")[2]
        else:
            fixed.append(override.input_line)
    return searched, fixed, typed


def trial_arguments(params: dict[str, Any]) -> list[str]:
    """A trial's values as command-line arguments (``model.beta=2.5``)."""
    return [f"{key}={value}" for key, value in params.items()]


class OptunaSearch:
    """Searches the command line's sweeps with an Optuna study (see the module's docstring):
    a Hydra sweeper's ``setup`` and ``sweep``, made a Sweeper by ``hydra_plugins``.

    Args:
        direction: ``minimize`` or ``maximize`` the task's return value (``optimized_metric``);
            ``auto``: the metric's own direction (:func:`objective`).
        n_trials: trials in all, counting those a stored study already ran.
        n_jobs: trials launched at once (through ``hydra/launcher``).
        storage: an Optuna storage URL (``sqlite:///search.db``), or None: in memory.
        study_name: the study's name in the storage.
        sampler: ``tpe`` or ``random``.
        seed: the sampler's seed.
    """

    def __init__(
        self,
        direction: str = AUTO,
        n_trials: int = 20,
        n_jobs: int = 1,
        storage: str | None = None,
        study_name: str = "vae-search",
        sampler: str = "tpe",
        seed: int = 0,
    ) -> None:
        if direction not in DIRECTIONS:
            raise ConfigError(
                "hydra.sweeper.direction", direction, "must be auto, minimize or maximize"
            )
        if sampler not in SAMPLERS:
            raise ConfigError("hydra.sweeper.sampler", sampler, f"must be one of {SAMPLERS}")
        for key, number in (("n_trials", n_trials), ("n_jobs", n_jobs)):
            if not isinstance(number, int) or number < 1:
                raise ConfigError(f"hydra.sweeper.{key}", number, "must be an integer >= 1")
        self.direction, self.n_trials, self.n_jobs = direction, n_trials, n_jobs
        self.storage, self.study_name, self.sampler, self.seed = storage, study_name, sampler, seed
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _study(self) -> Any:
        try:
            import optuna
        except ImportError:
            raise ConfigError(
                allowed="hydra/sweeper=optuna needs the optuna package, which is not installed; "
                'install it with: pip install "vae-experiments[tracking]" (or pip install optuna)'
            ) from None

        sampler = (
            optuna.samplers.TPESampler(seed=self.seed)
            if self.sampler == "tpe"
            else optuna.samplers.RandomSampler(seed=self.seed)
        )
        return optuna.create_study(
            study_name=self.study_name,
            storage=self.storage,
            sampler=sampler,
            direction=self.direction,
            load_if_exists=True,
        )

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        metric = self.config.get("optimized_metric")
        self.direction, warnings = objective(metric, self.direction, searched_keys(arguments))
        for warning in warnings:
            log.warning(warning)
        study = self._study()  # first: a missing optuna fails before anything is written
        from optuna.trial import TrialState

        searched, fixed, typed = split_arguments(arguments)
        if not searched:
            raise ConfigError(
                allowed="hydra/sweeper=optuna searches nothing: give at least one key as "
                "interval(a,b), choice(a,b,...) or range(a,b,step), e.g. "
                "'model.beta=interval(0.5,8)'"
            )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
        if done:
            log.info("study %s: %d trials already ran", self.study_name, len(done))
        remaining = self.n_trials - len(done)
        while remaining > 0:
            batch = [study.ask(searched) for _ in range(min(self.n_jobs, remaining))]
            jobs = [[*fixed, *trial_arguments(trial.params)] for trial in batch]
            returns = self.launcher.launch(jobs, initial_job_idx=batch[0].number)
            for trial, job in zip(batch, returns, strict=True):
                value = _job_value(job, metric)
                if isinstance(value, float):
                    study.tell(trial, value)
                else:
                    log.warning("trial %d failed: %s", trial.number, value)
                    study.tell(trial, state=TrialState.FAIL)
            remaining -= len(batch)
            write_search(sweep_dir, study, typed, fixed, metric, self.direction)
        best = _best(study)
        if best is None:
            log.warning("no trial of the search finished: see %s", sweep_dir / SEARCH_FILE)
        else:
            log.info(
                "best trial %d: %s=%s with %s",
                best.number,
                metric,
                best.value,
                " ".join(trial_arguments(best.params)),
            )
        return best


def _job_value(job: Any, metric: str | None) -> float | str:
    """The trial's value, or why there is none."""
    from hydra.core.utils import JobStatus

    try:
        value = job.return_value  # re-raises the exception of a job that failed
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    if job.status != JobStatus.COMPLETED:
        return f"the job ended {job.status.name}"
    if not isinstance(value, int | float) or value != value:
        return f"the run returned no number for optimized_metric={metric} ({value!r})"
    return float(value)


def _best(study: Any) -> Any:
    from optuna.trial import TrialState

    finished = [t for t in study.trials if t.state == TrialState.COMPLETE]
    return study.best_trial if finished else None


def write_search(
    sweep_dir: Path,
    study: Any,
    searched: dict[str, str],
    fixed: Sequence[str],
    metric: str | None,
    direction: str,
) -> Path:
    """Writes ``<sweep dir>/search.yaml``: what was searched (key -> as typed) with the fixed
    arguments, how, every trial of the study, and the best one (read by summarize.py)."""
    best = _best(study)
    record = {
        "optimized_metric": metric,
        "direction": direction,
        "study_name": study.study_name,
        "searched": dict(searched),
        "fixed": list(fixed),
        "best": None
        if best is None
        else {"trial": best.number, "value": best.value, "params": dict(best.params)},
        "trials": [
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                "value": t.value,
                "params": dict(t.params),
            }
            for t in study.trials
        ],
    }
    path = sweep_dir / SEARCH_FILE
    path.write_text(yaml.safe_dump(record, sort_keys=False))
    return path
