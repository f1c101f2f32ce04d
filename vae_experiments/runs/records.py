"""What a sweep report reads from each run directory: :class:`RunRecord`.

A sweep is any directory holding run directories at any depth: a Hydra multirun
(``multirun/<date>/<time>/<job>/``), a day of single runs (``outputs/<date>/``), or sweeps
nested inside each other. From each run it reads::

    .hydra/overrides.yaml   what was typed: ``model=vae``, ``model.latent_dim=16``, ...
    config.yaml             the composed config (fills in a key another run overrode); Hydra's
                            .hydra/config.yaml for a run that stopped before writing it
    .hydra/hydra.yaml       the config-group choices (``model: vae``), when Hydra wrote it
    metrics.json            test metrics; missing when the run failed or has not finished
    status.json             ``{"status": ..., "error": ...}``, when the run wrote one
    lock.json               who writes the run now: a run that says ``running`` while no live
                            process holds its lock (runs/lock.py) ``died``

Plain Python and OmegaConf.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from vae_experiments.runs.files import read_command_overrides, read_group_choices
from vae_experiments.runs.layout import (
    ANALYSIS_DIR,
    CONFIG_FILE,
    DIED,
    EVALUATE_RECORD_PATTERN,
    FINISHED,
    HYDRA_CONFIG_FILE,
    HYDRA_OVERRIDES_FILE,
    INCOMPLETE,
    METRICS_FILE,
    RUNNING,
    SEARCH_FILE,
    STATUS_FILE,
    is_run_dir,
)
from vae_experiments.runs.lock import writer_alive

log = logging.getLogger(__name__)

DELETED = "<deleted>"  # the value shown for a ``~key`` override


def parse_value(text: str) -> Any:
    """An override's value as Hydra would type it: int, float, bool, None, list, dict or str.

    YAML covers lists (``[8,16]``), booleans and ints; ``1e-3`` (not a float to YAML 1.1) is
    tried as a float. Anything unparseable stays the string that was typed.
    """
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """``"++model.network.hidden_dims=[16]"`` -> ``("model.network.hidden_dims", [16])``.

    The ``+``/``++`` prefixes (add, add or override) are dropped; a deletion ``~key`` gives the
    value ``"<deleted>"``.
    """
    text = text.strip()
    if text.startswith("~"):
        return text[1:].partition("=")[0], DELETED
    key, sep, value = text.lstrip("+").partition("=")
    if not sep:
        raise ValueError(f"override {text!r} is not of the form key=value")
    return key.strip(), parse_value(value)


@dataclass
class RunRecord:
    """One run of a sweep.

    Attributes:
        path: the run directory.
        name: its path relative to the sweep directory (``"."`` when the sweep is the run).
        overrides: ``.hydra/overrides.yaml`` in order, key -> parsed value, ``+``/``++`` stripped.
        metrics: ``metrics.json`` (empty when missing).
        status: ``status.json``'s status (``running``, ``finished``, ``failed``,
            ``interrupted``), ``died`` for a run that says ``running`` while no process holds its
            lock; without one, ``finished`` when ``metrics.json`` exists, else ``incomplete``.
        error: why the run has no results (``status.json``'s error, or ``"no metrics.json"``).
    """

    path: Path
    name: str
    overrides: dict[str, Any]
    metrics: dict[str, Any]
    status: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Finished with metrics: a row of the comparison."""
        return self.status == FINISHED and bool(self.metrics)

    def setting(self, key: str) -> Any:
        """The run's value of ``key``: its override, else its config-group choice (``model``) or
        composed config value (``model.latent_dim``); ``None`` when it has none or the value is a
        whole config node."""
        if key in self.overrides:
            return self.overrides[key]
        if key in self._choices:
            return self._choices[key]
        if self._config is None:
            return None
        try:
            node = OmegaConf.select(self._config, key, default=None)
        except Exception:  # an interpolation that only resolves inside Hydra, e.g. ${now:...}
            return None
        if isinstance(node, ListConfig):
            node = OmegaConf.to_container(node, resolve=False)
            if any(isinstance(v, (dict, list)) for v in node):
                return None
        return None if isinstance(node, DictConfig) else node

    @cached_property
    def _config(self) -> DictConfig | None:
        path = self.path / CONFIG_FILE
        if not path.is_file():
            path = self.path / HYDRA_CONFIG_FILE
        try:
            return OmegaConf.load(path)
        except Exception as err:  # a half-written config must not stop the report
            log.warning("cannot read %s: %s", path, err)
            return None

    @cached_property
    def _choices(self) -> dict[str, Any]:
        return read_group_choices(self.path)


def natural_key(text: str) -> list[Any]:
    """Sorts ``run/2`` before ``run/10``."""
    return [
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)
    ]


def find_run_dirs(root: str | Path) -> list[Path]:
    """Every directory under ``root`` (``root`` included) holding a run's config, in
    natural order of their paths. Hidden folders are not searched; symlinks are not followed."""
    root = Path(root)
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        if is_run_dir(dirpath):
            found.append(Path(dirpath))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return sorted(found, key=lambda p: natural_key(p.relative_to(root).as_posix()))


def read_overrides(run_dir: Path) -> dict[str, Any]:
    """``.hydra/overrides.yaml`` in order, key -> parsed value (:func:`parse_override`); empty
    when Hydra wrote none."""
    overrides = {}
    for item in read_command_overrides(run_dir):
        try:
            key, value = parse_override(item)
        except ValueError as err:
            log.warning("%s: %s", run_dir / HYDRA_OVERRIDES_FILE, err)
            continue
        overrides[key] = value
    return overrides


def _read_status(run_dir: Path, has_metrics: bool) -> tuple[str, str | None]:
    path = run_dir / STATUS_FILE
    if not path.is_file():
        return (FINISHED, None) if has_metrics else (INCOMPLETE, f"no {METRICS_FILE}")
    try:
        status = json.loads(path.read_text())
        word, error = str(status.get("status", "unknown")), status.get("error")
        if word == RUNNING and writer_alive(run_dir) is False:
            # Read again: the run may have ended between the two reads, releasing its lock.
            status = json.loads(path.read_text())
            if status.get("status") == RUNNING:
                return DIED, (
                    f"{STATUS_FILE} says running, but its process (pid {status.get('pid')}) is "
                    f"gone; resume={run_dir} continues it"
                )
            word, error = str(status.get("status", "unknown")), status.get("error")
        return word, error
    except (json.JSONDecodeError, AttributeError) as err:
        return "unknown", f"unreadable {STATUS_FILE}: {err}"


def read_run(run_dir: str | Path, sweep_dir: str | Path | None = None) -> RunRecord:
    """A :class:`RunRecord` of one run directory, named relative to ``sweep_dir``."""
    run_dir = Path(run_dir)
    name = run_dir.relative_to(sweep_dir).as_posix() if sweep_dir is not None else run_dir.name
    metrics: dict[str, Any] = {}
    metrics_error = None
    metrics_path = run_dir / METRICS_FILE
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text())
        except json.JSONDecodeError as err:
            metrics_error = f"unreadable {METRICS_FILE}: {err}"
    status, error = _read_status(run_dir, has_metrics=bool(metrics))
    if status == FINISHED and not metrics:
        error = metrics_error or f"no {METRICS_FILE}"
    return RunRecord(
        path=run_dir,
        name=name,
        overrides=read_overrides(run_dir),
        metrics=metrics,
        status=status,
        error=error,
    )


def collect_runs(sweep_dir: str | Path) -> list[RunRecord]:
    """Every run under ``sweep_dir`` (at any depth), in natural order of their paths.

    Raises:
        FileNotFoundError: ``sweep_dir`` is not a directory.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(
            f"{sweep_dir} is not a directory; pass a sweep directory such as "
            "multirun/<date>/<time> (or outputs/<date>)"
        )
    return [read_run(path, sweep_dir) for path in find_run_dirs(sweep_dir)]


def read_search(sweep_dir: str | Path) -> dict[str, Any] | None:
    """``<sweep dir>/search.yaml`` of a search (``hydra/sweeper=optuna``): ``optimized_metric``,
    ``direction``, ``searched`` (key -> as typed), ``fixed``, ``best`` and ``trials``; None
    for a sweep that is no search, or when the file cannot be read."""
    path = Path(sweep_dir) / SEARCH_FILE
    try:
        search = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return search if isinstance(search, dict) else None


def evaluation_records(
    run_dir: str | Path, split: str = "test"
) -> list[tuple[Path, dict[str, Any]]]:
    """Every ``scripts/evaluate.py`` record of ``split`` in the run's ``analysis/`` folder
    (``evaluate-*/evaluate_<split>.json``, and those of ``-m`` calls one folder deeper), newest
    first, as (path, record); an unreadable one is skipped with a warning."""
    analysis = Path(run_dir) / ANALYSIS_DIR
    name = EVALUATE_RECORD_PATTERN.format(split)
    paths = [*analysis.glob(f"evaluate*/{name}"), *analysis.glob(f"evaluate*/*/{name}")]
    found = []
    for path in sorted(paths, key=lambda p: p.stat().st_mtime_ns, reverse=True):
        try:
            found.append((path, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as err:
            log.warning("cannot read %s: %s", path, err)
    return found
