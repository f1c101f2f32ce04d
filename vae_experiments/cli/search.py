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

A range that holds no value (``interval(4,0.5)``, a log scale from 0) is one ``error:`` line
naming the argument and the fix, before anything is written (exit status 2, as any config
mistake: ``run_dirs.config_error_exit``).

A trial is one training run (a job of the sweep, in ``<sweep dir>/<trial number>-...``); its
value is what the task returns, the run's ``optimized_metric`` (``train.yaml``). A trial that
fails is recorded as failed (its run's ``status.json`` says why) and the search goes on. The
search is written to ``<sweep dir>/search.yaml`` after every batch of trials
(:data:`~vae_experiments.runs.layout.SEARCH_FILE`); ``python scripts/summarize.py <sweep dir>``
ranks its trials.

With ``hydra.sweeper.storage=sqlite:///search.db`` the study outlives the command: the same
command line again, in the same sweep directory or a new one, continues it. Its sampler is then
seeded from ``hydra.sweeper.seed`` and the number of trials the study holds
(:func:`sampler_seed`), so it draws new values (a new study draws the same values for the same
seed). A trial stopped by a signal (SIGTERM, Ctrl-C), or left running by a process that is gone
(killed), is recorded as failed with the user attribute ``interrupted`` (``interrupted`` in
``search.yaml``); the next command runs its values again first (a new trial, with the user
attribute ``rerun_of``), and an interrupted trial does not count towards ``n_trials``. The
command that continues a stopped search is printed when it stops.

Hydra builds sweepers only from classes defined in the ``hydra_plugins`` package, so
``hydra_plugins/vae_experiments_search`` defines the Sweeper on :class:`OptunaSearch`; Optuna is
imported when a search starts, so Hydra's scan of its plugins does not need it.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from vae_experiments.cli import run_dirs
from vae_experiments.runs import layout, lock
from vae_experiments.runs.files import read_metrics, read_status
from vae_experiments.runs.layout import SEARCH_FILE, metric_direction
from vae_experiments.targets import ConfigError

log = logging.getLogger(__name__)

#: ``hydra.sweeper.direction``: ``auto`` follows the metric (maximise ``val/elbo``, minimise
#: ``val/loss``: :func:`~vae_experiments.runs.layout.metric_direction`).
AUTO = "auto"
DIRECTIONS = (AUTO, "minimize", "maximize")
SAMPLERS = ("tpe", "random")
#: The command-line argument that makes a sweep a search (configs/hydra/sweeper/optuna.yaml).
SEARCH_ARGUMENT = "hydra/sweeper=optuna"

#: User attributes of a study's trials: the process that runs it (``{"pid": .., "host": ..}``),
#: what interrupted it (a signal's name), and the interrupted trial whose values it runs again.
PROCESS_ATTR, INTERRUPTED_ATTR, RERUN_OF_ATTR = "process", "interrupted", "rerun_of"

#: A job's directory in the sweep directory: ``<job number>-<run name>`` (train.yaml).
_JOB_DIR = re.compile(r"^(\d+)(?:-|$)")


def is_search_command(argv: Sequence[str]) -> bool:
    """Whether a command line (``sys.argv[1:]``) runs a search (``-m hydra/sweeper=optuna``)."""
    multirun = any(arg in ("-m", "--multirun") for arg in argv)
    return multirun and any(arg.lstrip("+") == SEARCH_ARGUMENT for arg in argv)


def is_search_job() -> bool:
    """Whether this Hydra job is a trial of a search (for its messages)."""
    try:
        return HydraConfig.get().runtime.choices.get("hydra/sweeper") == "optuna"
    except ValueError:  # no Hydra job: a test calling train() itself
        return False


def _numbers(*values: float) -> str:
    return ",".join(f"{value:g}" for value in values)


def _interval(low: float, high: float, log_scale: bool, integer: bool) -> str:
    """``interval(low,high)`` as typed: with ``tag(log, ...)`` and ``int(...)``."""
    text = f"interval({_numbers(low, high)})"
    text = f"tag(log, {text})" if log_scale else text
    return f"int({text})" if integer else text


def _check_interval(key: str, typed: str, value: IntervalSweep) -> None:
    """Raises ConfigError, naming the argument and the fix, for an interval with no value."""
    low, high = value.start, value.end
    log_scale = "log" in value.tags
    integer = isinstance(low, int) and isinstance(high, int)
    if low > high:
        raise ConfigError(
            key,
            typed,
            f"its low end {low:g} is above its high end {high:g}; write "
            f"{key}={_interval(high, low, log_scale, integer)}",
        )
    if log_scale and low <= 0:
        if high <= 0:
            fix = f"search it on a linear scale, {key}={_interval(low, high, False, integer)}"
        else:
            start = 1 if integer else high / 1e4
            fix = (
                f"start it above 0, e.g. {key}={_interval(start, high, True, integer)}, or "
                f"search it on a linear scale, {key}={_interval(low, high, False, integer)}"
            )
        raise ConfigError(
            key, typed, f"a log scale needs a low end above 0 (it has {low:g}); {fix}"
        )


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
        ConfigError: for a sweep Optuna cannot search, or a range that holds no value (naming
            the argument, the range and the fix).
    """
    import optuna.distributions as od

    value = override.value()
    key = override.get_key_element()
    typed = override.input_line.partition("=")[2]
    if isinstance(value, IntervalSweep):
        _check_interval(key, typed, value)
        if isinstance(value.start, int) and isinstance(value.end, int):
            return od.IntDistribution(value.start, value.end, log="log" in value.tags)
        return od.FloatDistribution(float(value.start), float(value.end), log="log" in value.tags)
    if isinstance(value, RangeSweep):
        if value.step == 0:
            raise ConfigError(key, typed, "its step is 0; give a step that is not 0")
        if not list(override.sweep_string_iterator()):
            raise ConfigError(
                key,
                typed,
                f"it holds no value: from {value.start:g} in steps of {value.step:g} it never "
                f"comes before {value.stop:g}; write e.g. "
                f"{key}=range({_numbers(value.stop, value.start, abs(value.step))})",
            )
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            values = range(value.start, value.stop, value.step)
            return od.IntDistribution(min(values), max(values), step=abs(value.step))
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


def sampler_seed(seed: int | None, trials_in_study: int) -> int | None:
    """The sampler's seed: ``seed`` itself for a new study, so that a search can be repeated;
    for a study that goes on, one derived from ``seed`` and the trials the study holds, so that
    it draws new values instead of its first ones again (the sampler starts afresh in each
    command). None: a random seed."""
    if seed is None or trials_in_study == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, trials_in_study]).generate_state(1)[0])


def is_interrupted(trial: Any) -> bool:
    """Whether a trial of the study was interrupted (by a signal, or its process is gone)."""
    return INTERRUPTED_ATTR in trial.user_attrs


def trial_state(trial: Any) -> str:
    """A trial's state as ``search.yaml`` says it: Optuna's (``complete``, ``fail``,
    ``running``, ``waiting``), or ``interrupted``."""
    return "interrupted" if is_interrupted(trial) else trial.state.name.lower()


class SearchStopped(KeyboardInterrupt):
    """A signal (SIGTERM) stopped the search outside training, where the run's own handler
    (training/interrupt.py) does not answer it; a KeyboardInterrupt, so that a job it stops
    records itself as interrupted as Ctrl-C does."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


@contextmanager
def _sigterm_stops_the_search() -> Iterator[None]:
    """SIGTERM raises :class:`SearchStopped` while inside (Python's default ends the process
    at once, and the trial it ran would stay running in the study)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SearchStopped(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class OptunaSearch:
    """Searches the command line's sweeps with an Optuna study (see the module's docstring):
    a Hydra sweeper's ``setup`` and ``sweep``, made a Sweeper by ``hydra_plugins``.

    The settings are checked when the search starts (:meth:`sweep`), so that a mistake is one
    ``error:`` line rather than Hydra's report of a constructor that failed.

    Args:
        direction: ``minimize`` or ``maximize`` the task's return value (``optimized_metric``);
            ``auto``: the metric's own direction (:func:`objective`).
        n_trials: trials in all, counting those a stored study already ran (interrupted ones
            do not count: they run again).
        n_jobs: trials launched at once (through ``hydra/launcher``).
        storage: an Optuna storage URL (``sqlite:///search.db``), or None: in memory.
        study_name: the study's name in the storage.
        sampler: ``tpe`` or ``random``.
        seed: the sampler's seed (see :func:`sampler_seed`); None: a random one.
    """

    def __init__(
        self,
        direction: str = AUTO,
        n_trials: int = 20,
        n_jobs: int = 1,
        storage: str | None = None,
        study_name: str = "vae-search",
        sampler: str = "tpe",
        seed: int | None = 0,
    ) -> None:
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

    def _check_settings(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ConfigError(
                "hydra.sweeper.direction", self.direction, "must be auto, minimize or maximize"
            )
        if self.sampler not in SAMPLERS:
            raise ConfigError("hydra.sweeper.sampler", self.sampler, f"must be one of {SAMPLERS}")
        for key, number in (("n_trials", self.n_trials), ("n_jobs", self.n_jobs)):
            if not isinstance(number, int) or number < 1:
                raise ConfigError(f"hydra.sweeper.{key}", number, "must be an integer >= 1")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**32):
            raise ConfigError(
                "hydra.sweeper.seed", self.seed, "must be an integer from 0 to 2**32 - 1, or null"
            )

    def _sampler(self, trials_in_study: int) -> Any:
        import optuna

        seed = sampler_seed(self.seed, trials_in_study)
        if self.sampler == "tpe":
            return optuna.samplers.TPESampler(seed=seed)
        return optuna.samplers.RandomSampler(seed=seed)

    def _open_storage(self) -> tuple[Any, int | None]:
        """The study's storage, and how many trials the study holds there (None: no such
        study yet).

        Raises:
            ConfigError: the storage cannot be opened; a stored study was made for the other
                direction.
        """
        import optuna

        try:
            storage = optuna.storages.get_storage(self.storage)
        except Exception as error:  # SQLAlchemy's: a bad URL, a folder that is not there
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConfigError(
                "hydra.sweeper.storage",
                self.storage,
                f"cannot be opened ({first_line}); give a database URL such as "
                "sqlite:///search.db (a file in a folder that exists), or null to keep the "
                "study in memory",
            ) from None
        try:
            study_id = storage.get_study_id_from_name(self.study_name)
        except KeyError:
            return storage, None
        stored = storage.get_study_directions(study_id)[0].name.lower()
        if stored != self.direction:
            raise ConfigError(
                "hydra.sweeper.direction",
                self.direction,
                f"the study {self.study_name} in {self.storage} was made to {stored}; give "
                f"hydra.sweeper.direction={stored} to continue it, or another "
                "hydra.sweeper.study_name for a new study",
            )
        return storage, len(storage.get_all_trials(study_id, deepcopy=False))

    def _check_sweep_dir(self, sweep_dir: Path) -> None:
        """Raises ConfigError unless a sweep directory that holds a search (``search.yaml``)
        holds this one: the same study in the same storage."""
        record_path = sweep_dir / SEARCH_FILE
        if not record_path.is_file():
            return
        recorded = yaml.safe_load(record_path.read_text()) or {}
        where = f"hydra.sweep.dir={sweep_dir} holds the search of another study ({record_path})"
        name, url = recorded.get("study_name"), recorded.get("storage")
        if self.storage is None:
            give = f"hydra.sweeper.storage={url}" if url else "its hydra.sweeper.storage"
            raise ConfigError(
                allowed=f"{where}; a search continues in its directory only from its stored "
                f"study: give {give} (and hydra.sweeper.study_name={name}), or choose another "
                "hydra.sweep.dir"
            )
        if name != self.study_name or (url is not None and url != self.storage):
            raise ConfigError(
                allowed=f"{where}: study {name} in {url}, not {self.study_name} in "
                f"{self.storage}; give hydra.sweeper.study_name={name} "
                f"hydra.sweeper.storage={url} to continue it, or choose another hydra.sweep.dir"
            )

    def _check_job_dirs(self, sweep_dir: Path, trials: int) -> None:
        """Raises ConfigError if the sweep directory has a job directory for a trial the study
        does not hold yet: a new trial would write into that run."""
        jobs = [int(m.group(1)) for p in sweep_dir.iterdir() if (m := _JOB_DIR.match(p.name))]
        if jobs and max(jobs) >= trials:
            raise ConfigError(
                allowed=f"hydra.sweep.dir={sweep_dir} holds runs of trials up to {max(jobs)}, "
                f"but study {self.study_name} in {self.storage} holds {trials} trials, so new "
                "trials would write into those runs; give the storage that search used (a "
                "relative sqlite:/// path is relative to the folder you run from), or choose "
                "another hydra.sweep.dir"
            )

    def _start(self, arguments: list[str]) -> tuple[Any, Path, dict, list[str], dict]:
        """Checks everything, then opens the study and the sweep directory.

        Raises:
            ConfigError: for a setting, a searched range, the storage or the sweep directory.
        """
        assert self.config is not None
        self._check_settings()
        try:
            import optuna
        except ImportError:
            raise ConfigError(
                allowed="hydra/sweeper=optuna needs the optuna package, which is not installed; "
                'install it with: pip install "vae-experiments[tracking]" (or pip install optuna)'
            ) from None
        searched, fixed, typed = split_arguments(arguments)
        if not searched:
            raise ConfigError(
                allowed="hydra/sweeper=optuna searches nothing: give at least one key as "
                "interval(a,b), choice(a,b,...) or range(a,b,step), e.g. "
                "'model.beta=interval(0.5,8)'"
            )
        metric = self.config.get("optimized_metric")
        self.direction, warnings = objective(metric, self.direction, searched_keys(arguments))
        for warning in warnings:
            log.warning(warning)
        sweep = self.config.hydra.sweep
        if not OmegaConf.is_interpolation(sweep, "dir"):  # given: checked before the storage
            self._check_sweep_dir(Path(str(sweep.dir)))  # is opened (it may make a database)
        storage, trials = self._open_storage()
        # Resolved only now: the default (a new folder under multirun/) is made when resolved.
        sweep_dir = Path(str(sweep.dir))
        self._check_sweep_dir(sweep_dir)
        if sweep_dir.is_dir():
            self._check_job_dirs(sweep_dir, trials or 0)
        study = optuna.create_study(
            study_name=self.study_name,
            storage=storage,
            sampler=self._sampler(trials or 0),
            direction=self.direction,
            load_if_exists=True,
        )
        return study, sweep_dir, searched, fixed, typed

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        try:
            study, sweep_dir, searched, fixed, typed = self._start(arguments)
        except run_dirs.CONFIG_ERRORS as error:
            run_dirs.discard_command_line_dir(sys.argv[1:])
            run_dirs.config_error_exit(*run_dirs.config_error_message(error))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        metric = self.config.get("optimized_metric")
        record = {"searched": typed, "fixed": fixed, "metric": metric}

        def write() -> None:
            write_search(sweep_dir, study, **record, direction=self.direction, storage=self.storage)

        if study.trials:
            log.info(
                "study %s holds %d trials; new values are drawn with sampler seed %s (from "
                "hydra.sweeper.seed=%s and the number of trials)",
                self.study_name,
                len(study.trials),
                sampler_seed(self.seed, len(study.trials)),
                self.seed,
            )
        rerun = recover_interrupted(study)
        counted = [t for t in study.trials if t.state.is_finished() and not is_interrupted(t)]
        if rerun:
            log.info("interrupted trials %s run again first, with their values", rerun)
        write()  # first: the sweep directory is a search's from now on (run_dirs)
        if study.trials:
            log.info("%d trials count towards n_trials=%d", len(counted), self.n_trials)
        remaining = self.n_trials - len(counted)
        batch: list[Any] = []
        try:
            with _sigterm_stops_the_search():
                while remaining > 0:
                    batch = [self._ask(study, searched) for _ in range(min(self.n_jobs, remaining))]
                    jobs = [[*fixed, *trial_arguments(trial.params)] for trial in batch]
                    returns = self.launcher.launch(jobs, initial_job_idx=batch[0].number)
                    for index, (trial, job) in enumerate(zip(batch, returns, strict=True)):
                        job_dir = _job_dir(sweep_dir, batch[0].number + index)
                        _record(study, trial, _job_value(job, metric), job_dir, metric)
                    batch = []
                    remaining -= len(jobs)
                    write()
        except BaseException as stop:
            # A stop (SIGTERM, Ctrl-C: the job's SystemExit, or a KeyboardInterrupt) or a
            # launcher's failure: the batch's trials are told how their runs ended.
            interrupted = self._stopped(study, batch, sweep_dir, metric, stop)
            write()
            if not isinstance(stop, KeyboardInterrupt | SystemExit):
                raise
            log.warning(self._continue_hint(interrupted, sweep_dir))
            if isinstance(stop, KeyboardInterrupt):  # exit as a signal does, not a traceback
                raise SystemExit(128 + signal.Signals[_stop_name(stop)].value) from None
            raise
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

    def _ask(self, study: Any, searched: dict[str, Any]) -> Any:
        """A new trial (an interrupted trial's values first), marked with this process."""
        trial = study.ask(searched)
        trial.set_user_attr(PROCESS_ATTR, {"pid": os.getpid(), "host": socket.gethostname()})
        return trial

    def _stopped(
        self, study: Any, batch: Sequence[Any], sweep_dir: Path, metric: str | None, stop: Any
    ) -> list[int]:
        """Tells the study how the batch's trials that a stop left untold ended, from their
        runs; returns the numbers of those recorded as interrupted."""
        from optuna.trial import TrialState

        states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
        interrupted = []
        for index, trial in enumerate(batch):
            if states.get(trial.number) != TrialState.RUNNING:
                continue
            job_dir = _job_dir(sweep_dir, batch[0].number + index)
            if _record(study, trial, None, job_dir, metric, stopped_by=_stop_name(stop)):
                interrupted.append(trial.number)
        return interrupted

    def _continue_hint(self, interrupted: Sequence[int], sweep_dir: Path) -> str:
        """What the search says when it stops: what became of its trials, and what to type."""
        recorded = sweep_dir / SEARCH_FILE
        head = "search stopped" + (
            f": trial {', '.join(map(str, interrupted))} recorded as interrupted in study "
            f"{self.study_name} and in {recorded}"
            if interrupted
            else f" between trials ({recorded})"
        )
        if self.storage is None:
            return (
                f"{head}. The study was in memory (hydra.sweeper.storage=null), so no command "
                "can continue it: the same command starts a new search. With "
                "hydra.sweeper.storage=sqlite:///search.db a stopped search can be continued"
            )
        argv = list(sys.argv[1:])
        if not any(arg.startswith("hydra.sweep.dir=") for arg in argv):
            argv.append(f"hydra.sweep.dir={sweep_dir}")
        again = "runs the interrupted trials' values again first, then " if interrupted else ""
        return (
            f"{head}. Continue the search with: {shlex.join(['python', 'train.py', *argv])} "
            f"(it {again}the trials still missing)"
        )


def recover_interrupted(study: Any) -> list[int]:
    """Records the trials left running by a process that is gone (killed) as interrupted, and
    queues a new trial with the values of each interrupted trial that has none yet.

    Returns:
        The numbers of the interrupted trials whose values are queued by this call.
    """
    import optuna
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        process = trial.user_attrs.get(PROCESS_ATTR) or {}
        # A trial of a search from before trials named their process has no owner to ask.
        alive = lock.process_alive(process["pid"], process["host"]) if process else False
        if alive is False:
            # optuna.trial.Trial is how a running trial's attributes are set; it needs the id.
            optuna.trial.Trial(study, trial._trial_id).set_user_attr(
                INTERRUPTED_ATTR, "process gone"
            )
            study.tell(trial.number, state=TrialState.FAIL)
            log.warning(
                "trial %d of study %s was left running by a process that is gone: recorded "
                "as interrupted",
                trial.number,
                study.study_name,
            )
    trials = study.get_trials(deepcopy=False)
    queued = {t.user_attrs.get(RERUN_OF_ATTR) for t in trials}
    rerun = [t for t in trials if is_interrupted(t) and t.number not in queued]
    for trial in rerun:
        study.enqueue_trial(trial.params, user_attrs={RERUN_OF_ATTR: trial.number})
    return [t.number for t in rerun]


def _job_dir(sweep_dir: Path, number: int) -> Path | None:
    """The directory of the sweep's job ``number`` (``<number>-<run name>``), None if none."""
    for path in sweep_dir.iterdir() if sweep_dir.is_dir() else ():
        match = _JOB_DIR.match(path.name)
        if match and int(match.group(1)) == number and path.is_dir():
            return path
    return None


def _record(
    study: Any,
    trial: Any,
    value: float | str | None,
    job_dir: Path | None,
    metric: str | None,
    stopped_by: str | None = None,
) -> bool:
    """Tells the study how a trial ended: with its value, failed, or interrupted (FAIL with
    the user attribute ``interrupted``) when its run's ``status.json`` says so.

    Args:
        value: what the job returned (:func:`_job_value`); None for a trial whose job a stop
            cut short (``stopped_by`` names the stop): it is read from its run, which may have
            finished or failed, and is interrupted otherwise (also when it never started).

    Returns:
        Whether the trial was recorded as interrupted.
    """
    from optuna.trial import TrialState

    try:
        status = (read_status(job_dir) or {}) if job_dir is not None else {}
    except ValueError:  # not a status we wrote: say nothing of it
        status = {}
    word = status.get("status")
    interrupted_by = None
    if word == layout.INTERRUPTED:
        interrupted_by = status.get("signal") or stopped_by or "a stop"
    elif value is None and word == layout.FINISHED:
        value = _run_value(job_dir, metric)
    elif value is None and word == layout.FAILED:
        value = f"{status.get('error', 'failed')}"
    elif value is None:
        interrupted_by = stopped_by or "a stop"
    if interrupted_by is not None:
        trial.set_user_attr(INTERRUPTED_ATTR, interrupted_by)
        log.warning("trial %d was interrupted (%s)", trial.number, interrupted_by)
        study.tell(trial, state=TrialState.FAIL)
        return True
    if isinstance(value, float):
        study.tell(trial, value)
    else:
        log.warning("trial %d failed: %s", trial.number, value)
        study.tell(trial, state=TrialState.FAIL)
    return False


def _run_value(run_dir: Path, metric: str | None) -> float | str:
    """A finished run's ``optimized_metric`` from its ``metrics.json``, or why there is none."""
    try:
        value = read_metrics(run_dir).get(metric)
    except (OSError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    if not isinstance(value, int | float) or value != value:
        return f"the run has no number for optimized_metric={metric} ({value!r})"
    return float(value)


def _stop_name(stop: BaseException) -> str:
    """The signal that stopped the search: SIGTERM (:class:`SearchStopped`, or a job that
    exited 143), SIGINT (Ctrl-C), or else what the exception is."""
    if isinstance(stop, SearchStopped):
        return stop.signal_name
    if isinstance(stop, KeyboardInterrupt):
        return "SIGINT"
    if isinstance(stop, SystemExit) and isinstance(stop.code, int) and stop.code > 128:
        try:
            return signal.Signals(stop.code - 128).name
        except ValueError:
            pass
    return type(stop).__name__


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
    storage: str | None = None,
) -> Path:
    """Writes ``<sweep dir>/search.yaml``: the study (its name and storage), what was searched
    (key -> as typed) with the fixed arguments, how, every trial of the study (with what
    interrupted it, or which interrupted trial it runs again), and the best one (read by
    summarize.py)."""
    best = _best(study)
    trials = []
    for t in study.trials:
        entry = {"trial": t.number, "state": trial_state(t), "value": t.value}
        entry["params"] = dict(t.params)
        for attr in (INTERRUPTED_ATTR, RERUN_OF_ATTR):
            if attr in t.user_attrs:
                entry[attr] = t.user_attrs[attr]
        trials.append(entry)
    record = {
        "optimized_metric": metric,
        "direction": direction,
        "study_name": study.study_name,
        "storage": storage,
        "searched": dict(searched),
        "fixed": list(fixed),
        "best": None
        if best is None
        else {"trial": best.number, "value": best.value, "params": dict(best.params)},
        "trials": trials,
    }
    path = sweep_dir / SEARCH_FILE
    path.write_text(yaml.safe_dump(record, sort_keys=False))
    return path
