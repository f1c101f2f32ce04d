"""Where a training run's files go: a directory of its own for each new run, the same one again
for a resumed run, and never a directory that another run already wrote.

Hydra writes ``<run dir>/.hydra/`` before our code runs, so the choice is made while Hydra
resolves ``hydra.run.dir``, by the resolvers registered here (``configs/train.yaml``):

- ``${run_dir:${resume},<pattern>}``: the directory ``resume`` names, or else a new directory
  from ``<pattern>`` (``outputs/<date>/<time>``) that :func:`claim_fresh_dir` has created, so two
  runs started in the same second get two directories;
- ``${fresh_dir:<pattern>}``: the same for a sweep's directory;
- ``${config_subdir:${resume}}``: ``.hydra``, or nothing when resuming, so that the run's saved
  config is not replaced by the one composed for the ``resume=`` command line.

A directory given on the command line (``hydra.run.dir=runs/x``) is checked by
:func:`refuse_existing_run_dir` before Hydra starts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from vae_experiments.cli import hydra_compat
from vae_experiments.runs import holds_a_run, is_first_process, read_group_choices, run_dir_of

#: Config groups of train.yaml: a resumed run keeps its choices.
CONFIG_GROUPS = ("model", "data", "trainer", "logger", "scheduler", "optimizer")


def claim_fresh_dir(pattern: str) -> str:
    """``pattern`` if no such path exists, else ``pattern_1``, ``pattern_2``, ...; the chosen
    directory is created here (atomically), so a concurrent run cannot choose it too."""
    candidate, number = pattern, 0
    while True:
        try:
            Path(candidate).mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            number += 1
            candidate = f"{pattern}_{number}"


def run_dir(resume: str | None, pattern: str) -> str:
    """Resolver of ``hydra.run.dir``: the resumed run's directory, or a fresh one."""
    if resume is None:
        return claim_fresh_dir(pattern)
    try:
        return str(run_dir_of(resume, key="resume"))
    except FileNotFoundError as error:
        # SystemExit passes through OmegaConf as it is: one line instead of a long traceback.
        raise SystemExit(f"error: {error}") from None


def config_subdir(resume: str | None) -> str | None:
    """Resolver of ``hydra.output_subdir``: none when resuming (the run keeps its config)."""
    return ".hydra" if resume is None else None


def register_resolvers() -> None:
    """Registers ``run_dir``, ``fresh_dir`` and ``config_subdir`` (once). Cached: a directory is
    chosen once per command, and Hydra hands the choice on to a sweep's jobs."""
    resolvers = {"run_dir": run_dir, "fresh_dir": claim_fresh_dir, "config_subdir": config_subdir}
    for name, function in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function, use_cache=True)


def refuse_existing_run_dir(argv: Sequence[str], resumable: bool = True) -> None:
    """Exits with a message if ``hydra.run.dir=`` (or, with ``-m``, ``hydra.sweep.dir=``) on the
    command line names a directory where a run already is: Hydra would overwrite its config.
    ``resumable``: whether the message offers ``resume=`` (train.py; not compare_pca.py).

    Not checked when resuming, in the extra processes of a distributed run (they join the
    first one's directory) and in a SLURM job that was requeued (it continues its own run).
    """
    if any(arg.startswith(("resume=", "+resume=", "++resume=")) for arg in argv):
        return
    if not is_first_process() or int(os.environ.get("SLURM_RESTART_COUNT", 0)) > 0:
        return
    multirun = any(arg in ("-m", "--multirun") for arg in argv)
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    for arg in argv:
        if not arg.startswith(key) or "${" in arg:
            continue
        directory = Path(arg[len(key) :].strip("'\"")).expanduser()
        taken = (
            [d for d in directory.iterdir() if d.is_dir() and holds_a_run(d)]
            if multirun and directory.is_dir()
            else ([directory] if holds_a_run(directory) else [])
        )
        if taken:
            resume = f"continue that run with resume={taken[0]}, " if resumable else ""
            raise SystemExit(
                f"error: {arg} names a directory that already holds "
                f"{'runs' if multirun else 'a run'} ({taken[0]}); nothing is overwritten. "
                f"Choose another directory, {resume}or delete it first"
            )


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


def resumed_config(
    saved: DictConfig,
    composed: DictConfig,
    overrides: Sequence[str],
    saved_choices: dict[str, str] | None = None,
) -> tuple[DictConfig, list[str]]:
    """The saved config of a run with this command line's ``key=value`` overrides applied.

    ``composed`` is the config Hydra built from the command line (defaults plus overrides), so
    each override's value is already parsed and typed there.

    Args:
        saved: the run's config.
        composed: what Hydra composed from this command line.
        overrides: this command line's overrides.
        saved_choices: the run's config-group choices (:func:`read_group_choices`); a group
            override equal to the run's choice (``model=vae`` re-typed from the run's own
            command) is accepted.

    Returns:
        The config, and the overrides that changed a value.

    Raises:
        ValueError: for an override that picks another config group than the run's
            (``model=ae``), or deletes a key.
    """
    config = saved.copy()
    saved_choices = saved_choices or {}
    changed = []
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
        if OmegaConf.select(config, key) != value:
            with open_dict(config):
                OmegaConf.update(config, key, value, force_add=True)
            changed.append(override.input_line)
    return config, changed
