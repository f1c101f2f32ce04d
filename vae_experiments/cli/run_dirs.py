"""Where a training run's files go: a directory of its own for each new run, the same one again
for a resumed run, and never a directory that another run already wrote.

Hydra writes ``<run dir>/.hydra/`` before our code runs, so the choice is made while Hydra
resolves ``hydra.run.dir``, by the resolvers registered here (``configs/train.yaml``):

- ``${run_dir:${resume},<pattern>}``: the directory ``resume`` names, or else a new directory
  from ``<pattern>`` (``outputs/<date>/<time>``) that :func:`claim_fresh_dir` has created, so two
  runs started in the same second get two directories;
- ``${fresh_dir:<pattern>}``: the same for a sweep's directory;
- ``${config_subdir:${resume}}``: ``.hydra``, or nothing when resuming, so that the run's saved
  config is not replaced by the one composed for the ``resume=`` command line;
- ``${run_name:<model>,<data>,<overrides>}``: what the run is, after its time (or its job number
  in a sweep), e.g. ``outputs/2026-11-30/03-42-06-vae-fashion_mnist-latent_dim=32``, so that
  folders, TensorBoard's runs and MLflow's and W&B's run names tell runs apart and still sort by
  time.

A directory given on the command line (``hydra.run.dir=runs/x``) is checked by
:func:`refuse_existing_run_dir` before Hydra starts.

One run, one writer: the command locks its run directory (``lock.json``, runs/lock.py) when the
directory is chosen, before Hydra writes into it (:func:`lock_command_line_dir` for one given on
the command line), and holds the lock until it ends; a sweep's job locks its own directory
(:func:`owns_run_dir`). Only the first process of a run takes it: the extra processes of DDP
join its directory. A config mistake is one ``error:`` line (exit status 2, see
:data:`CONFIG_ERROR_STATUS`) and leaves nothing behind (:func:`owns_run_dir`).
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import GrammarParseError, InterpolationResolutionError, MissingMandatoryValue

from vae_experiments.cli import hydra_compat
from vae_experiments.data.errors import DataError
from vae_experiments.runs import (
    DiskFullError,
    holds_a_run,
    is_first_process,
    lock,
    read_group_choices,
    run_dir_of,
)
from vae_experiments.runs.layout import LOCK_FILE, SEARCH_FILE, SWEEP_CONFIG_FILE
from vae_experiments.targets import ConfigError, format_value

T = TypeVar("T")

#: Exit status of a command stopped by a config mistake (a usage error, as argparse's 2): it did
#: not start, and left nothing behind. A refused run directory and a failed run exit with 1.
CONFIG_ERROR_STATUS = 2

#: Errors that are config mistakes: a value our checks refuse, a required value not given
#: (``???``), an interpolation that does not resolve; and bad input data (a folder without
#: images, a corrupt file: :class:`~vae_experiments.data.errors.DataError`), found while the
#: data is prepared, before training starts.
CONFIG_ERRORS = (
    ConfigError,
    DataError,
    MissingMandatoryValue,
    InterpolationResolutionError,
    GrammarParseError,
)

#: Config groups of train.yaml: a resumed run keeps its choices.
CONFIG_GROUPS = ("model", "data", "trainer", "logger", "scheduler", "optimizer", "experiment")

#: What a resume may change, each key with everything below it: how long and how the run trains,
#: how it is logged and shown, and how its data are loaded. Everything else is what the run
#: optimises (``model.*``, ``seed``, ``callbacks.checkpoint.*``: which checkpoint is best) or on
#: what data (``data.*`` but the loading settings below: source, path, split, binarisation, batch
#: size), and stays as the run was trained: two objectives or two datasets in one run would pick
#: best.ckpt across them and report test metrics of weights never trained on what they measure.
#: A run with no checkpoint yet has trained nothing, and any value may change
#: (:func:`resumed_config`). README.md, "Stopping and resuming", lists the same.
RESUME_MAY_CHANGE = (
    "trainer",  # max_epochs, max_steps, limit_train_batches, gradient clipping, devices, precision
    "optimizer",  # lr, weight_decay, ...: training/optimizer_settings.py applies them
    "scheduler",
    "logger",
    "callbacks.image_grids",
    "callbacks.latent_samples",
    "callbacks.progress_bar",
    "data.num_workers",
    "data.on_device",
    "data.eval_batch_size",
    "data.source.cache",
    "data.source.cache_dir",
    "data.source.download",
    "optimized_metric",
    "test_ckpt",
    "compile",
    "channels_last",
    "steps_per_group",
    "float32_matmul_precision",
    "threads",
)
#: Keys below :data:`RESUME_MAY_CHANGE` that stay as trained all the same: what class is built
#: (the checkpoint holds that class's state), and which validation batches best.ckpt is chosen on.
RESUME_KEEPS = ("_target_", "_partial_", "trainer.limit_val_batches", "trainer.overfit_batches")

#: Characters kept in a folder name made from settings; others become ``_`` (no ``/``).
UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._=+-]")

#: Overrides that say where a run goes or how it is shown, not what it is: left out of its name.
UNNAMED_OVERRIDES = (
    "hydra",
    "resume",
    "ckpt_path",
    "logger",
    "callbacks",
    "trainer.enable_",
    "optimized_metric",
    "threads",
)

#: Longest run name, in characters (file systems allow 255 per folder name).
MAX_RUN_NAME = 120


def claim_fresh_dir(pattern: str) -> str:
    """``pattern`` if no such path exists, else ``pattern_1``, ``pattern_2``, ...; the chosen
    directory is created here (atomically), so a concurrent run cannot choose it too."""
    return claim_fresh_dir_and_parents(pattern)[0]


def claim_fresh_dir_and_parents(pattern: str) -> tuple[str, list[Path]]:
    """:func:`claim_fresh_dir`, and the directories it created (outermost first): what a
    command that stops on a mistake removes again."""
    candidate, number = pattern, 0
    while True:
        created = lock.missing_dirs(candidate)
        try:
            Path(candidate).mkdir(parents=True, exist_ok=False)
            return candidate, created
        except FileExistsError:
            number += 1
            candidate = f"{pattern}_{number}"


def run_dir(resume: str | None, pattern: str) -> str:
    """Resolver of ``hydra.run.dir``: the resumed run's directory, or a fresh one; locked for
    this command (in its first process) before Hydra writes there."""
    if resume is None:
        directory, created = claim_fresh_dir_and_parents(pattern)
    else:
        try:
            directory, created = str(run_dir_of(resume, key="resume")), []
        except (FileNotFoundError, ValueError) as error:
            # SystemExit passes through OmegaConf as it is: one line instead of a long traceback.
            config_error_exit(str(error))
    if is_first_process():
        _lock_or_exit(directory, created)
    return directory


def _lock_or_exit(directory: str | Path, created: Sequence[Path] = ()) -> lock.RunLock:
    """The run directory's lock, or an exit with one ``error:`` line: another run holds it, or
    the disk is full (the full-disk line of ``runs/files.py``, as for any file of a run)."""
    try:
        return lock.acquire(directory, created)
    except (lock.RunLocked, DiskFullError) as error:
        raise SystemExit(f"error: {error}") from None


def config_error_exit(message: str, hint: str | None = None) -> NoReturn:
    """Ends the command for a config mistake: ``error: <message>`` (and ``hint: <hint>``) on
    stderr, exit status :data:`CONFIG_ERROR_STATUS`."""
    sys.stderr.write(f"error: {message}\n" + (f"hint: {hint}\n" if hint else ""))
    sys.stderr.flush()
    raise SystemExit(CONFIG_ERROR_STATUS)


def config_error_message(error: BaseException) -> tuple[str, str | None]:
    """The ``error:`` line (and a hint, or None) for one of :data:`CONFIG_ERRORS`."""
    if isinstance(error, MissingMandatoryValue) and getattr(error, "full_key", None):
        key = error.full_key
        return (
            f"{key} is required and has no value (??? in the config)",
            f"give it on the command line: {key}=<value>",
        )
    if not isinstance(error, ConfigError | DataError):
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        key = getattr(error, "full_key", None)
        return (f"{key}: {first_line}" if key else first_line), None
    return str(error), None


def config_subdir(resume: str | None) -> str | None:
    """Resolver of ``hydra.output_subdir``: none when resuming (the run keeps its config)."""
    return ".hydra" if resume is None else None


def run_name(model: str | None, data: str | None, overrides: Sequence[str] = ()) -> str:
    """Resolver: what a run is, ``<model>-<data>-<key>=<value>...`` from its config-group choices
    and its command line's overrides, keys shortened to their last part
    (``vae-fashion_mnist-latent_dim=32-lr=0.001``); overrides that only say where the run goes
    or how it is logged (:data:`UNNAMED_OVERRIDES`) are left out. At most
    :data:`MAX_RUN_NAME` characters, safe as a folder name."""
    parts = [str(part) for part in (model, data) if part]
    for override in overrides:
        key, _, value = str(override).lstrip("+~").partition("=")
        if key in ("model", "data") or key.startswith(UNNAMED_OVERRIDES):
            continue
        parts.append(f"{key.rpartition('.')[2].rpartition('/')[2]}={_short(value)}")
    return UNSAFE_NAME_CHARS.sub("_", "-".join(parts))[:MAX_RUN_NAME].rstrip("-")


def _short(value: str) -> str:
    """A number as a name shows it: ``3.781904084470194`` -> ``3.782`` (the config keeps all)."""
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}" if len(value) > 6 and "." in value else value


def register_resolvers() -> None:
    """Registers ``run_dir``, ``fresh_dir``, ``config_subdir`` and ``run_name`` (once). Cached: a
    directory is chosen once per command, and Hydra hands the choice on to a sweep's jobs."""
    resolvers = {
        "run_dir": run_dir,
        "fresh_dir": claim_fresh_dir,
        "config_subdir": config_subdir,
        "run_name": run_name,
    }
    for name, function in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function, use_cache=True)


def _command_line_dir(argv: Sequence[str]) -> tuple[str, Path] | None:
    """(the argument, the directory) of ``hydra.run.dir=`` (``hydra.sweep.dir=`` with ``-m``)
    on the command line; None if there is none or it has an interpolation."""
    multirun = any(arg in ("-m", "--multirun") for arg in argv)
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    for arg in argv:
        if arg.startswith(key) and "${" not in arg:
            return arg, Path(arg[len(key) :].strip("'\"")).expanduser()
    return None


def refuse_existing_run_dir(argv: Sequence[str], resumable: bool = True) -> None:
    """Exits with a message if ``hydra.run.dir=`` (or, with ``-m``, ``hydra.sweep.dir=``) on the
    command line names a directory where a run already is (Hydra would overwrite its config),
    or one that holds files that are not runs (the user's own: Hydra would mix a run's files
    with them). A new or empty directory is fine. ``resumable``: whether the message offers
    ``resume=`` (train.py; not compare_pca.py).

    The sweep directory of a search (it holds ``search.yaml``) is left to a search, which
    continues its study there (``cli/search.py`` checks that it is the same study); any other
    command is refused there.

    Not checked when resuming, in the extra processes of a distributed run (they join the
    first one's directory) and in a SLURM job that was requeued (it continues its own run).
    """
    if any(arg.startswith(("resume=", "+resume=", "++resume=")) for arg in argv):
        return
    if not is_first_process() or int(os.environ.get("SLURM_RESTART_COUNT", 0)) > 0:
        return
    given = _command_line_dir(argv)
    if given is None or not given[1].is_dir():
        return
    arg, directory = given
    multirun = arg.startswith("hydra.sweep.dir=")
    if multirun and (directory / SEARCH_FILE).is_file():
        from vae_experiments.cli.search import is_search_command

        if is_search_command(argv):
            return  # a search continues in its own directory: the search checks it is its own
        raise SystemExit(
            f"error: {arg} names the directory of a search ({directory / SEARCH_FILE} is "
            "there); nothing is overwritten. Continue the search with its own command "
            "(hydra/sweeper=optuna and its hydra.sweeper.storage), choose another directory "
            "or delete it first"
        )
    entries = [entry for entry in directory.iterdir() if entry.name != LOCK_FILE]
    taken = (
        [d for d in entries if d.is_dir() and holds_a_run(d)]
        if multirun
        else ([directory] if holds_a_run(directory) else [])
    )
    if taken:
        resume = f"continue that run with resume={taken[0]}, " if resumable else ""
        raise SystemExit(
            f"error: {arg} names a directory that already holds "
            f"{'runs' if multirun else 'a run'} ({taken[0]}); nothing is overwritten. "
            f"Choose another directory, {resume}or delete it first"
        )
    if multirun and any(entry.name == SWEEP_CONFIG_FILE for entry in entries):
        raise SystemExit(
            f"error: {arg} names the directory of another sweep ({directory / SWEEP_CONFIG_FILE} "
            "is there); nothing is overwritten. Choose another directory or delete it first"
        )
    if entries:
        names = ", ".join(sorted(entry.name for entry in entries)[:3])
        raise SystemExit(
            f"error: {arg} names a directory that holds files that are not "
            f"{'runs' if multirun else 'a run'} ({names}{', ...' if len(entries) > 3 else ''}); "
            "nothing is overwritten. Choose a new or empty directory, e.g. a subdirectory of it"
        )


# Hydra's flags that print something instead of running the task.
_NO_RUN_FLAGS = (
    "--help",
    "-h",
    "--hydra-help",
    "--cfg",
    "-c",
    "--info",
    "-i",
    "--shell-completion",
    "-sc",
)


def lock_command_line_dir(argv: Sequence[str]) -> None:
    """Locks the directory that ``hydra.run.dir=`` (``hydra.sweep.dir=`` with ``-m``) on the
    command line names, creating it if missing, before Hydra writes there; exits with a message
    naming the holder if another process holds it. Only in the first process of a run."""
    if any(arg.split("=")[0] in _NO_RUN_FLAGS for arg in argv):
        return  # --help, --cfg job...: Hydra prints and runs nothing
    given = _command_line_dir(argv)
    if given is not None and is_first_process():
        _lock_or_exit(given[1])


def discard_command_line_dir(argv: Sequence[str]) -> None:
    """For a command that stopped on a config mistake before it ran anything: removes the
    directory that ``hydra.run.dir=`` (``hydra.sweep.dir=`` with ``-m``) on the command line
    names if this command created it, or else what it wrote there
    (:meth:`~vae_experiments.runs.lock.RunLock.discard`), and releases its lock."""
    given = _command_line_dir(argv)
    if given is not None and is_first_process():
        _lock_or_exit(given[1]).discard()


def owns_run_dir(task: Callable[[DictConfig], T]) -> Callable[[DictConfig], T]:
    """Decorator of a training task function (below ``@hydra.main``): the run directory is this
    command's for the task's life, and a config mistake leaves nothing behind.

    The first process takes the run directory's lock (the lock that choosing the directory took
    already, or, in a sweep's job, a new one) and releases it when the task ends. The config is
    checked before the task's heavy imports. A config mistake or bad input data
    (:data:`CONFIG_ERRORS`) found before any checkpoint was written ends a single run with
    :func:`config_error_exit`, after
    :meth:`~vae_experiments.runs.lock.RunLock.discard` removed what the command wrote; in a
    sweep, the job fails as any failed job does (recorded in its status.json) and the others run.
    """

    @functools.wraps(task)
    def wrapper(cfg: DictConfig) -> T:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        single_run = HydraConfig.get().mode != RunMode.MULTIRUN
        claim = _lock_or_exit(run_dir) if is_first_process() else None
        try:
            # A resumed run's config is checked by _resume; a sweep's job by training (which
            # records the failure in its status.json).
            if single_run and not cfg.get("resume"):
                check_early(cfg)
            return task(cfg)
        except CONFIG_ERRORS as error:
            if claim is None or not single_run or claim.wrote_checkpoints():
                raise
            claim.discard()
            config_error_exit(*config_error_message(error))
        finally:
            if claim is not None:
                claim.release()

    return wrapper


def check_early(cfg: DictConfig) -> None:
    """Raises one of :data:`CONFIG_ERRORS` for a config that cannot train: a required value
    (``???``) not given, an interpolation that does not resolve, a value our checks or a
    constructor refuse; the cheap checks first, so that their mistakes need no torch."""
    from vae_experiments.config_checks import (
        check_by_building,
        check_config,
        check_values,
        choose_likelihood,
    )

    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    check_values(cfg)  # imports nothing: a mistake here fails before torch is imported
    choose_likelihood(cfg)  # model/likelihood=auto: the one the data call for
    # Seconds sooner than training: Lightning is not imported yet.
    check_config(cfg, lightning=False)
    check_by_building(cfg, _group_choices())


def _group_choices() -> dict[str, str] | None:
    """This Hydra job's config-group choices (``{"model": "cvae", ...}``), or None outside one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return {str(k): str(v) for k, v in HydraConfig.get().runtime.choices.items() if v is not None}


def _resume_value(argv: Sequence[str]) -> str | None:
    """The value of ``resume=`` (``+resume=``, ``++resume=``) on a command line, or None."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+") == "resume" and value not in ("", "null"):
            return value.strip("'\"")
    return None


def with_saved_choices(argv: Sequence[str], config_dir: str | Path) -> list[str]:
    """The command line of ``resume=DIR ...`` with the run's saved config-group choices put
    first (``model=vae model/network=mlp data=digits ...``, from its ``.hydra/hydra.yaml``), so
    that Hydra composes the command line's keys against the run's own groups
    (``model.network.hidden_dims`` exists for an MLP run, not for the default conv body).

    Groups the command line chooses itself are left to it (:func:`resumed_config` refuses a
    choice that differs from the run's), and so are choices that the installed configs no
    longer have. Any other command line is returned as it is.
    """
    argv = list(argv)
    resume = _resume_value(argv)
    if resume is None:
        return argv
    try:
        saved = read_group_choices(run_dir_of(resume, key="resume"))
    except (FileNotFoundError, ValueError):
        return argv  # the run_dir resolver reports a bad resume= in one line
    chosen = {arg.partition("=")[0].lstrip("+") for arg in argv if "=" in arg}
    prepended = [
        f"{group}={choice}"
        for group, choice in saved.items()
        if group not in chosen and (Path(config_dir) / group / f"{choice}.yaml").is_file()
    ]
    return [*prepended, *argv]


def _key_under(key: str, prefixes: Sequence[str]) -> bool:
    """Whether dotted ``key`` is one of ``prefixes`` or below one (``trainer.max_epochs`` is
    below ``trainer``; ``data.source.cache_dir`` is not below ``data.source.cache``)."""
    return any(key == prefix or key.startswith(f"{prefix}.") for prefix in prefixes)


def resume_may_change(key: str) -> bool:
    """Whether a resume may change the value of dotted ``key`` (:data:`RESUME_MAY_CHANGE`)."""
    if key.rpartition(".")[2] in RESUME_KEEPS or _key_under(key, RESUME_KEEPS):
        return False
    return _key_under(key, RESUME_MAY_CHANGE)


def _override_key(line: str) -> str:
    """``model.beta`` of ``model.beta=4``, ``+model.beta=4`` or ``~model.beta``."""
    return line.lstrip("+~").partition("=")[0]


def new_run_command(
    started_with: Sequence[str], overrides: Sequence[str], checkpoint: str | Path
) -> str:
    """``python train.py <the run's overrides> <these> ckpt_path=<checkpoint>``: a new run from
    a run's checkpoint, with the run's settings and ``overrides`` in place of its own values,
    ready to paste (quoted where a shell needs it)."""

    def a_setting(line: str) -> bool:  # not which run, nor where it goes
        key = _override_key(line)
        return key not in ("resume", "ckpt_path") and not key.startswith("hydra.")

    given = [line for line in overrides if a_setting(line)]
    keys = {_override_key(line) for line in given}
    kept = [line for line in started_with if a_setting(line) and _override_key(line) not in keys]
    return shlex.join(["python", "train.py", *kept, *given, f"ckpt_path={checkpoint}"])


def resumed_config(
    saved: DictConfig,
    composed: DictConfig,
    overrides: Sequence[str],
    saved_choices: dict[str, str] | None = None,
    *,
    checkpoint: str | Path | None,
    started_with: Sequence[str] = (),
) -> tuple[DictConfig, list[str]]:
    """The saved config of a run with this command line's ``key=value`` overrides applied: the
    one rule of what a resume may change.

    ``composed`` is the config Hydra built from the command line (defaults plus overrides), so
    each override's value is already parsed and typed there. Values that equal the run's own
    (its command line again, as a cluster script re-submits it) change nothing.

    Args:
        saved: the run's config.
        composed: what Hydra composed from this command line.
        overrides: this command line's overrides.
        saved_choices: the run's config-group choices (:func:`read_group_choices`); a group
            override equal to the run's choice (``model=vae`` re-typed from the run's own
            command) is accepted.
        checkpoint: the checkpoint the run continues from; None for a run that has none yet
            (it failed or was stopped before its first): it trains again from the start, so any
            value may change (a corrected ``data.source.path``).
        started_with: the overrides the run was started with (``.hydra/overrides.yaml``), for
            the command that starts a new run from the checkpoint instead.

    Returns:
        The config, and the overrides that changed a value.

    Raises:
        ValueError: for an override that picks another config group than the run's
            (``model=ae``), deletes a key, or changes a value that :func:`resume_may_change`
            keeps (``model.beta=4``, ``data.source.path=...``) in a run with a checkpoint; the
            message names each, the run's value, and the command that starts a new run from
            the checkpoint with it.
    """
    config = saved.copy()
    saved_choices = saved_choices or {}
    changed, refused = [], []
    for override in hydra_compat.parse_overrides(overrides):
        key = override.key_or_group
        if key in ("resume", "ckpt_path") or key.startswith("hydra."):
            continue
        is_group = key in CONFIG_GROUPS or "/" in key
        if is_group and saved_choices.get(key) == override.value():
            continue  # the run's own choice, as its command line had it
        if is_group or override.is_delete():
            trained_with = (
                f"this run was trained with {key}={saved_choices[key]}; "
                if key in saved_choices
                else ""
            )
            raise ValueError(
                f"{override.input_line}: {trained_with}a resumed run keeps its config groups "
                "and keys; only values can change (e.g. trainer.max_epochs=60). Start a new "
                "run for this, or start one from this run's weights with ckpt_path=<its "
                "last.ckpt>"
            )
        value: Any = OmegaConf.select(composed, key)
        missing = object()
        before = OmegaConf.select(config, key, default=missing)
        if before == value:
            continue
        if checkpoint is not None and not resume_may_change(key):
            run_value = f"{key}={_shown(before)}" if before is not missing else f"no {key}"
            refused.append(f"{override.input_line} (this run was trained with {run_value})")
            continue
        with open_dict(config):
            OmegaConf.update(config, key, value, force_add=True)
        changed.append(override.input_line)
    if refused:
        given = [
            line
            for line in overrides
            if not (
                _override_key(line) in saved_choices
                and saved_choices[_override_key(line)] == line.partition("=")[2]
            )
        ]
        raise ValueError(
            f"{', '.join(refused)}: a resume continues what the run optimises, on its data, and "
            "changes only how long and how it trains (trainer.*, optimizer.*, scheduler.*, "
            "logger.*, data loading: README.md, Stopping and resuming); nothing was changed. "
            "Start a new run from its weights with this instead: "
            f"{new_run_command(started_with, given, checkpoint)}"
        )
    return config, changed


def _shown(value: Any) -> str:
    """A config value as the command line types it (``1.0``, ``[512, 256]``, ``null``)."""
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    return format_value(value)
