"""Sweep reports: every run's settings and test metrics in one table, and a metric plotted against
a swept value.

The runs are read by :mod:`vae_experiments.runs.records` (what each file of a run gives).

Plain Python, OmegaConf and matplotlib (no pyplot), so it works in a notebook::

    records = collect_runs("multirun/2026-11-25/14-03-12")
    table = summary_table(records, sort_by="test/recon_mse")
    print(table.to_markdown())
    plot_summary(table).savefig("recon_mse.png")
"""

from __future__ import annotations

import csv
import fnmatch
import io
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure, SubFigure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

from vae_experiments.analysis.disentanglement import METRIC_PREFIX, SCORE_KEYS
from vae_experiments.runs.records import (
    DELETED,
    RunRecord,
    collect_runs,
    find_run_dirs,
    natural_key,
    parse_override,
    parse_value,
    read_run,
)
from vae_experiments.units import LIKELIHOOD_KEY, likelihood_unit, metric_unit

log = logging.getLogger(__name__)

__all__ = [
    "DELETED",
    "RunRecord",
    "SummaryTable",
    "SeedGroup",
    "collect_runs",
    "disentanglement_metrics",
    "find_run_dirs",
    "generation_metrics",
    "parse_override",
    "parse_value",
    "plot_search",
    "plot_summary",
    "read_run",
    "run_unit",
    "seed_groups",
    "seed_report",
    "summary_table",
    "unit_groups",
    "write_summary",
]


def format_value(value: Any) -> str:
    """A setting or metric as a table cell: ``[8,16]`` as Hydra writes it, floats to 5 digits."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.5g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------
# The table


def _order_key(value: Any) -> tuple:
    """Sorts numbers numerically, before strings; missing values last."""
    if value is None:
        return (2, 0.0, "")
    if is_number(value):
        return (0, float(value), "")
    return (1, 0.0, format_value(value))


@dataclass
class SummaryTable:
    """The rows of a sweep report (see :func:`summary_table`).

    Attributes:
        records: finished runs in sort order, then the runs without results.
        swept: keys whose value differs between runs, in the order they were typed.
        fixed: keys with the same value in every run, and (with the default metric columns)
            metrics with the same value in every finished run.
        metrics: metric columns.
        sort_by, descending: how the finished runs were ordered.
        settings: run name -> key -> the run's value of every overridden key (read from the
            run's config where it did not override it; ``None`` when it has none).
        units: run name -> the unit ``sort_by`` is in for that run, when the finished runs
            have it in more than one (an AE's squared error, a VAE's nats): they are sorted
            within each unit, and the table has a ``unit`` column; else empty.
    """

    records: list[RunRecord]
    swept: list[str]
    fixed: dict[str, Any]
    metrics: list[str]
    sort_by: str | None
    descending: bool
    settings: dict[str, dict[str, Any]] = field(repr=False, default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)

    @property
    def failures(self) -> list[RunRecord]:
        return [r for r in self.records if not r.ok]

    @property
    def columns(self) -> list[str]:
        """``run``, ``unit`` when the runs are sorted within units, the swept keys, the metrics,
        then ``status`` when some run has no results."""
        extra = ["status"] if self.failures else []
        return ["run", *self._unit_column, *self.swept, *self.metrics, *extra]

    @property
    def _unit_column(self) -> list[str]:
        return ["unit"] if self.units else []

    def rows(self) -> list[dict[str, Any]]:
        """One dict per run, column -> raw value (``None`` where missing)."""
        rows = []
        for record in self.records:
            row = {"run": record.name}
            if self.units:
                row["unit"] = self.units.get(record.name)
            row.update({key: self.settings[record.name].get(key) for key in self.swept})
            row.update({key: record.metrics.get(key) for key in self.metrics})
            row["status"] = record.status
            rows.append(row)
        return rows

    def to_markdown(self) -> str:
        """The fixed settings, the table, and a section listing the runs without results."""
        lines = []
        if self.fixed:
            fixed = ", ".join(f"{k}={format_value(v)}" for k, v in self.fixed.items())
            lines += [f"fixed: {fixed}", ""]
        order = f" (sorted by {self.sort_by}, {'descending' if self.descending else 'ascending'}"
        if self.units:
            # An AE's squared error and a VAE's nats side by side: say why they are not ranked.
            units = ", ".join(sorted(set(self.units.values())))
            order += f", within each unit ({units}): one likelihood's do not rank against another's"
            shared = f"{self.sort_by.rpartition('/')[0]}/recon_mse"
            if any(shared in r.metrics for r in self.records):
                order += f"; --sort {shared} ranks every run"
        order += ")"
        lines += [f"{len(self.records)} runs{order if self.sort_by else ''}", ""]
        columns = self.columns
        lines.append("| " + " | ".join(_md_cell(c) for c in columns) + " |")
        lines.append(
            "|" + "|".join(" ---: " if c in self.metrics else " --- " for c in columns) + "|"
        )
        for row in self.rows():
            cells = ["" if row[c] is None else format_value(row[c]) for c in columns]
            lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
        if self.failures:
            lines += ["", "## Failed or unfinished runs", ""]
            for record in self.failures:
                error = f": {_one_line(record.error)}" if record.error else ""
                lines.append(f"- `{record.name}` ({record.path}): {record.status}{error}")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """The same rows as CSV, full precision, empty cells where missing, plus ``status`` and
        ``error`` columns."""
        columns = ["run", *self._unit_column, *self.swept, *self.metrics, "status", "error"]
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for record, row in zip(self.records, self.rows(), strict=True):
            row["error"] = record.error
            writer.writerow([_csv_cell(row[c]) for c in columns])
        return buffer.getvalue()


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return format_value(value)


def _metric_order(name: str) -> tuple:
    return (0 if name.startswith("test/") else 1, name)


def summary_table(
    records: Sequence[RunRecord],
    sort_by: str | None = "test/loss",
    descending: bool = False,
    metrics: Sequence[str] | None = None,
    keys: Sequence[str] = (),
) -> SummaryTable:
    """Orders a sweep's runs by a metric and splits settings into swept and fixed.

    Args:
        records: from :func:`collect_runs`.
        sort_by: the metric to order finished runs by (``None``: by swept values). Ties, and runs
            lacking the metric, follow in order of their swept values (numbers numerically), then
            of their names. Runs without results come last. A metric in the unit of the run's
            likelihood (:mod:`vae_experiments.units`) orders the runs within each unit, the
            units in name order, when the runs have more than one.
        descending: largest first (for metrics where higher is better, e.g. ``test/elbo``).
        metrics: metric columns; names or shell patterns (``test/*``). Default: every metric of
            any run that differs between the finished runs (one value everywhere goes to
            ``fixed``), ``sort_by`` first, then ``test/*``, then the others; ``val/*`` only when
            ``sort_by`` is one of them.
        keys: config keys to compare besides the overridden ones, read from each run's config
            (``model.k`` of runs made with ``experiment=`` presets, which set it without an
            override); swept when their values differ.

    Raises:
        ValueError: ``sort_by`` or a requested metric is in no run's metrics.
    """
    records = list(records)
    available = sorted({k for r in records for k in r.metrics}, key=_metric_order)

    constant: dict[str, Any] = {}
    if metrics is None:
        # Only what tells runs apart: a metric with one value in every finished run goes to the
        # fixed line; val/* (the last validation epoch) only when ordering by one of them.
        finished_runs = [r for r in records if r.ok]
        shows_val = bool(sort_by and sort_by.startswith("val/"))
        columns = []
        for name in available:
            if name.startswith("val/") and not shows_val:
                continue
            values = {format_value(r.metrics.get(name)) for r in finished_runs}
            if len(finished_runs) > 1 and len(values) == 1 and name != sort_by:
                constant[name] = finished_runs[0].metrics.get(name)
            else:
                columns.append(name)
        if sort_by in columns:
            columns.remove(sort_by)
            columns.insert(0, sort_by)
    else:
        columns = []
        for pattern in metrics:
            matched = [m for m in available if fnmatch.fnmatchcase(m, pattern)]
            if not matched:
                raise ValueError(
                    f"no run has a metric {pattern!r}; metrics found: {', '.join(available)}"
                )
            columns += [m for m in matched if m not in columns]
    if sort_by is not None and available and sort_by not in available:
        raise ValueError(
            f"cannot sort by {sort_by!r}: no run has it; metrics found: {', '.join(available)}"
        )

    keys = list(keys)
    for record in records:
        keys += [k for k in record.overrides if k not in keys]
    settings = {r.name: {k: r.setting(k) for k in keys} for r in records}
    swept, fixed = [], {}
    for key in keys:
        shown = {format_value(settings[r.name][key]) for r in records}
        if len(shown) > 1:
            swept.append(key)
        else:
            fixed[key] = settings[records[0].name][key]
    fixed.update(constant)

    def settings_key(record: RunRecord) -> tuple:
        return (
            tuple(_order_key(settings[record.name][k]) for k in swept),
            natural_key(record.name),
        )

    def metric_key(record: RunRecord) -> tuple:
        value = record.metrics.get(sort_by) if sort_by else None
        if not is_number(value) or math.isnan(value):
            return (1, 0.0)
        return (0, -value if descending else value)

    finished_runs = [r for r in records if r.ok]
    units = {r.name: run_unit(r, sort_by) for r in finished_runs} if sort_by else {}
    if len(set(units.values())) < 2:
        units = {}  # one unit: rank them all

    def order(record: RunRecord) -> tuple:
        return (units.get(record.name, ""), metric_key(record), settings_key(record))

    finished = sorted(finished_runs, key=order)
    failed = sorted((r for r in records if not r.ok), key=settings_key)
    return SummaryTable(
        records=finished + failed,
        swept=swept,
        fixed=fixed,
        metrics=columns,
        sort_by=sort_by,
        descending=descending,
        settings=settings,
        units=units,
    )


def run_unit(record: RunRecord, metric: str) -> str:
    """The unit ``metric`` is in for ``record``'s run (:func:`~vae_experiments.units.metric_unit`
    of its likelihood); ``""`` for a metric with one meaning in every run."""
    return metric_unit(metric, likelihood_unit(record.setting(LIKELIHOOD_KEY)))


#: The columns of a comparison of generators (``summarize.py --generation``), in this order:
#: the sample quality that ``scripts/evaluate.py`` writes, then the likelihood or reconstruction
#: terms of whichever runs have them (an AE has no ELBO; every model has a ``recon``).
GENERATION_METRICS = (
    "test/fd_classifier",
    "test/sample_precision",
    "test/sample_recall",
    "test/fid_inception",
    "test/quality_samples",
    "test/log_px",
    "test/elbo",
    "test/recon",
    "test/recon_mse",
)


def generation_metrics(records: Sequence[RunRecord]) -> list[str]:
    """The :data:`GENERATION_METRICS` that some run has, in that order.

    Raises:
        ValueError: no run has ``test/fd_classifier`` (none was evaluated), saying what to run.
    """
    available = {key for record in records for key in record.metrics}
    if GENERATION_METRICS[0] not in available:
        raise ValueError(
            f"no run has {GENERATION_METRICS[0]}: measure each run's samples first with "
            "python scripts/evaluate.py run=<run dir>"
        )
    return [key for key in GENERATION_METRICS if key in available]


# --------------------------------------------------------------------------------------------
# Disentanglement: each model's scores over its seeds

#: The columns of a disentanglement report (``summarize.py --disentanglement``): the scores
#: ``scripts/evaluate.py`` writes on data with factors, then reconstruction and KL beside them.
DISENTANGLEMENT_METRICS = tuple(f"test/{METRIC_PREFIX}{key}" for key in SCORE_KEYS)
DISENTANGLEMENT_BESIDE = ("test/recon", "test/kl")


def disentanglement_metrics(records: Sequence[RunRecord]) -> list[str]:
    """The :data:`DISENTANGLEMENT_METRICS`, then those of :data:`DISENTANGLEMENT_BESIDE` that
    some run has.

    Raises:
        ValueError: no run has ``test/disentanglement.mig`` (none was scored), saying what to run.
    """
    available = {key for record in records for key in record.metrics}
    if DISENTANGLEMENT_METRICS[0] not in available:
        raise ValueError(
            f"no run has {DISENTANGLEMENT_METRICS[0]}: score each run first with python "
            "scripts/evaluate.py run=<run dir> (on data with factors, e.g. data=shapes)"
        )
    return [*DISENTANGLEMENT_METRICS, *(k for k in DISENTANGLEMENT_BESIDE if k in available)]


def is_seed_key(key: str) -> bool:
    """A key that seeds a run (``seed``, ``data.seed``) rather than configuring it; the data's
    ``split_seed`` changes the data and is not one."""
    return key == "seed" or key.endswith(".seed")


@dataclass
class SeedGroup:
    """Finished runs of one configuration that differ only in their seed.

    Attributes:
        settings: the swept keys other than the seed -> this group's value.
        runs: its runs, in the table's order.
        seeds: each run's seed (``seed``), in the same order.
    """

    settings: dict[str, Any]
    runs: list[RunRecord]
    seeds: list[Any]

    def statistics(self, metric: str) -> dict[str, float] | None:
        """``mean``, ``std`` (the sample standard deviation, N - 1; 0 for one run), ``min``,
        ``max`` and ``n`` of ``metric`` over the runs that have it (NaN left out); None when
        none has."""
        values = [
            float(r.metrics[metric])
            for r in self.runs
            if is_number(r.metrics.get(metric)) and not math.isnan(r.metrics[metric])
        ]
        if not values:
            return None
        n = len(values)
        mean = sum(values) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
        return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def seed_groups(table: SummaryTable) -> list[SeedGroup]:
    """The table's finished runs grouped by their config minus the seed: by the values of its
    swept keys other than :func:`is_seed_key` ones; groups in the order of their first run."""
    keys = [k for k in table.swept if not is_seed_key(k)]
    groups: dict[str, SeedGroup] = {}
    for record in table.records:
        if not record.ok:
            continue
        settings = {k: table.settings[record.name].get(k) for k in keys}
        name = format_value(settings)
        if name not in groups:
            groups[name] = SeedGroup(settings, [], [])
        groups[name].runs.append(record)
        groups[name].seeds.append(record.setting("seed"))
    return list(groups.values())


def _significant(value: float, digits: int) -> str:
    """``value`` to ``digits`` significant digits, never in exponent notation (``1425``,
    ``660``, ``0.0059``), so a mean and its spread line up."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{round(value, decimals):.{decimals}f}"


def _short(metric: str) -> str:
    """``test/disentanglement.mig`` -> ``mig``; other metrics as they are."""
    return metric.removeprefix(f"test/{METRIC_PREFIX}")


def seed_report(groups: Sequence[SeedGroup], metrics: Sequence[str]) -> str:
    """Markdown: one row per configuration, each metric as ``mean ± std`` over its seeds."""
    keys = list(groups[0].settings) if groups else []
    columns = [*keys, "runs", "seeds", *(_short(m) for m in metrics)]
    lines = [
        "| " + " | ".join(_md_cell(c) for c in columns) + " |",
        "|" + "|".join(" --- " for _ in [*keys, "runs", "seeds"]) + "|" + " ---: |" * len(metrics),
    ]
    for group in groups:
        cells = [format_value(group.settings[k]) for k in keys]
        cells += [str(len(group.runs)), ",".join(format_value(s) for s in group.seeds)]
        for metric in metrics:
            stats = group.statistics(metric)
            if stats is None:
                cells.append("")
            elif stats["n"] == 1:
                cells.append(_significant(stats["mean"], 4))
            else:
                cells.append(f"{_significant(stats['mean'], 4)} ± {_significant(stats['std'], 2)}")
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def seed_report_csv(groups: Sequence[SeedGroup], metrics: Sequence[str]) -> str:
    """The same groups as CSV: per metric its mean, std, min, max and n, full precision."""
    keys = list(groups[0].settings) if groups else []
    stats_names = ("mean", "std", "min", "max", "n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*keys, "runs", "seeds", *(f"{m}:{s}" for m in metrics for s in stats_names)])
    for group in groups:
        row = [_csv_cell(group.settings[k]) for k in keys]
        row += [len(group.runs), " ".join(format_value(s) for s in group.seeds)]
        for metric in metrics:
            stats = group.statistics(metric) or {}
            row += [_csv_cell(stats.get(s)) for s in stats_names]
        writer.writerow(row)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# The plot


def default_x(table: SummaryTable) -> str | None:
    """The first swept key whose values (in finished runs) are all numbers, else ``None``."""
    finished = [r for r in table.records if r.ok]
    for key in table.swept:
        values = [table.settings[r.name][key] for r in finished]
        if values and all(is_number(v) for v in values):
            return key
    return None


def plot_filename(metric: str) -> str:
    """``test/recon_mse`` -> ``summary_test_recon_mse.png``."""
    return "summary_" + (re.sub(r"[^A-Za-z0-9._-]+", "_", metric).strip("_") or "metric") + ".png"


def unit_groups(table: SummaryTable, metric: str) -> dict[str, list[RunRecord]]:
    """The table's runs split by the unit ``metric`` is in (:func:`run_unit`: by likelihood,
    ``squared_error``, ``discretized_logistic``, for a term in the likelihood's unit; else one
    group, ``""``)."""
    groups: dict[str, list[RunRecord]] = {}
    for record in table.records:
        groups.setdefault(run_unit(record, metric), []).append(record)
    return groups


#: Most x ticks an axis gets at the runs' own values; more, or values whose labels would run
#: into each other (:func:`_room_for_labels`), get matplotlib's evenly spaced ticks.
MAX_VALUE_TICKS = 12
#: Width of a plot's axis, in inches, and of a tick label's character at matplotlib's default
#: 10-point font (with a gap between labels): what :func:`_room_for_labels` compares.
AXIS_INCHES, CHAR_INCHES, LABEL_GAP_INCHES = 5.5, 0.09, 0.15


def _tick_label(value: float) -> str:
    """A tick's number, short: ``0.001``, ``3.782``, ``1e-05``."""
    return f"{value:.4g}"


def _room_for_labels(positions: Sequence[float], log: bool) -> bool:
    """Whether labels at ``positions`` (sorted) fit side by side on an axis of
    :data:`AXIS_INCHES` (in log space on a log axis): a random search's 3.677 and 3.782 do not."""
    if len(positions) > MAX_VALUE_TICKS:
        return False
    if len(positions) < 2:
        return True
    points = [math.log10(p) for p in positions] if log else list(positions)
    span = points[-1] - points[0]
    for (a, b), (label_a, label_b) in zip(
        zip(points, points[1:], strict=False),
        zip(positions, positions[1:], strict=False),
        strict=True,
    ):
        width = CHAR_INCHES * (len(_tick_label(label_a)) + len(_tick_label(label_b))) / 2
        if (b - a) / span * AXIS_INCHES < width + LABEL_GAP_INCHES:
            return False
    return True


def log_ticks(axis: Any, low: float, high: float, most: int = 6) -> None:
    """Ticks of a log axis over [low, high] at 1, 2 and 5 times powers of ten (fewer where
    they would crowd: at most ``most``), labelled as plain numbers; the minor ticks unlabelled.
    matplotlib's own labels the minor ticks of a range under a decade, one over another
    ("2x10^-3 3x10^-3 4x10^-3")."""
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    for subs in ((1, 2, 5), (1, 3), (1,)):
        ticks = [m * 10.0**e for e in range(first, last + 1) for m in subs]
        ticks = [t for t in ticks if low * 0.999 <= t <= high * 1.001]
        if len(ticks) <= most:
            break
    if len(ticks) > most:  # many decades: every n-th power of ten
        ticks = ticks[:: math.ceil(len(ticks) / most)]
    if len(ticks) < 2:  # a narrow range: its ends
        ticks = [low, high]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda value, _: _tick_label(value)))
    axis.set_minor_formatter(NullFormatter())


def plot_summary(
    table: SummaryTable, metric: str | None = None, x: str | None = None, connect: bool = True
) -> Figure:
    """A metric against a swept value, one line per combination of the other swept values; one
    axis per unit the metric has in these runs (:func:`unit_groups`: a loss in nats and a loss
    in squared error are not drawn on one axis).

    Args and Raises: as :func:`plot_one_unit`.
    """
    metric = metric or table.sort_by or (table.metrics[0] if table.metrics else None)
    groups = {
        unit: records
        for unit, records in unit_groups(table, metric).items()
        if any(r.ok and is_number(r.metrics.get(metric)) for r in records)
    }
    if len(groups) <= 1:
        return plot_one_unit(table, metric, x, connect=connect)
    figure = Figure(figsize=(7.0 * len(groups), 4.8), layout="constrained")
    for panel, (unit, records) in zip(
        figure.subfigures(1, len(groups)), groups.items(), strict=True
    ):
        models = sorted({format_value(r.setting("model")) for r in records})
        plot_one_unit(
            replace(table, records=records),
            metric,
            x,
            panel,
            f"{unit} ({', '.join(models)})",
            connect=connect,
        )
    return figure


def plot_one_unit(
    table: SummaryTable,
    metric: str | None = None,
    x: str | None = None,
    figure: Figure | SubFigure | None = None,
    unit: str = "",
    connect: bool = True,
) -> Figure | SubFigure:
    """A metric against a swept value, one line per combination of the other swept values.

    Runs are joined by a line only where they form a curve: runs that differ in ``x`` alone.
    The trials of a search (``connect=False``), and runs whose other swept values each go with
    one value of ``x`` and are numbers (a random search's draws), are points.

    Args:
        table: from :func:`summary_table`.
        metric: the y value (default: the table's ``sort_by``).
        x: a swept key (default: :func:`default_x`). Numbers go on a numeric axis (log-scale
            when they span two orders of magnitude or more), other values on a categorical one.
            With no such key, a horizontal bar per run, in table order.

        figure: where to draw (a panel of a larger figure); default: a new figure.
        unit: what the metric measures in these runs, shown beside its name.
        connect: whether runs may be joined by lines (False for a search's trials).

    Raises:
        ValueError: the metric is in no finished run, or ``x`` is not a swept key.
    """
    metric = metric or table.sort_by or (table.metrics[0] if table.metrics else None)
    runs = [r for r in table.records if r.ok and is_number(r.metrics.get(metric))]
    if not runs:
        raise ValueError(f"no finished run has the metric {metric!r}; nothing to plot")
    if x is not None and x not in table.swept:
        swept = ", ".join(table.swept) or "none"
        raise ValueError(f"--x {x!r} is not a swept key; swept keys: {swept}")
    x = x if x is not None else default_x(table)
    not_shown = len(table.records) - len(runs)
    note = f"{len(runs)} runs" + (f"; {not_shown} without {metric} not shown" if not_shown else "")

    ylabel = f"{metric} [{unit}]" if unit else metric
    if x is None:
        return _bar_chart(table, runs, metric, note, figure, ylabel)

    # A key whose values pair one-to-one with x's (experiment=burda_iwae_k50 beside model.k=50)
    # would give each point a line of its own.
    paired = [k for k in table.swept if k != x and _one_to_one(table, runs, k, x)]
    others = [k for k in table.swept if k != x and k not in paired]
    # A preset named beside its model.k is the same value twice; a number drawn with each x
    # (beta and lr of a random search) makes the points no curve.
    curve = connect and not any(
        all(is_number(table.settings[r.name][k]) for r in runs) for k in paired
    )
    groups: dict[tuple, list[RunRecord]] = {}
    for record in runs:
        label = tuple(table.settings[record.name][k] for k in others)
        groups.setdefault(tuple(format_value(v) for v in label), []).append(record)

    xs_all = [table.settings[r.name][x] for r in runs]
    numeric = all(is_number(v) for v in xs_all)
    if numeric:
        position = {format_value(v): float(v) for v in xs_all}
    else:
        distinct = sorted({format_value(v): v for v in xs_all}.values(), key=_order_key)
        position = {format_value(v): float(i) for i, v in enumerate(distinct)}

    outside = len(groups) > 8  # a long legend goes beside the axes, not over the lines
    fig = figure or Figure(figsize=(9.0 if outside else 7.0, 4.8), layout="constrained")
    ax = fig.add_subplot()
    colors = _colors(len(groups))

    def group_order(item):
        return tuple(_order_key(table.settings[item[1][0].name][k]) for k in others)

    for color, (label, members) in zip(
        colors, sorted(groups.items(), key=group_order), strict=False
    ):
        points = sorted(
            (position[format_value(table.settings[r.name][x])], float(r.metrics[metric]))
            for r in members
        )
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="o",
            markersize=6,
            linewidth=1.8,
            linestyle="-" if curve else "none",
            color=color,
            label=", ".join(label) if others else None,
        )

    values = sorted(set(position.values()))
    # Geometric sweeps (lr 1e-4..1e-2, IWAE k 1, 5, 50) read on a log axis; 2..16 stays linear.
    log_axis = numeric and values[0] > 0 and values[-1] / values[0] >= 20
    if log_axis:
        ax.set_xscale("log")
    if not numeric:
        labels = {p: k for k, p in position.items()}
        ax.set_xticks(values, [labels[v] for v in values])
        ax.set_xlim(values[0] - 0.5, values[-1] + 0.5)
    elif _room_for_labels(values, log_axis):  # a grid's own values, labelled as typed
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(values, [_tick_label(v) for v in values])
    elif log_axis:
        log_ticks(ax.xaxis, values[0], values[-1])

    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} against {x}\n{note}", fontsize="medium")
    ax.grid(True, alpha=0.3)
    if others:
        ax.legend(
            title=", ".join(others),
            loc="upper left" if outside else "best",
            bbox_to_anchor=(1.01, 1.0) if outside else None,
            fontsize="small",
        )
    return fig


def _one_to_one(table: SummaryTable, runs: list[RunRecord], key: str, x: str) -> bool:
    """Whether the runs' values of ``key`` and of ``x`` determine each other."""
    pairs = {
        (format_value(table.settings[r.name][key]), format_value(table.settings[r.name][x]))
        for r in runs
    }
    return len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})


def _colors(n: int) -> list:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _bar_chart(
    table: SummaryTable,
    runs: list[RunRecord],
    metric: str,
    note: str,
    figure: Figure | SubFigure | None = None,
    label: str | None = None,
) -> Figure | SubFigure:
    """One horizontal bar per run, labelled by its swept values (the keys name the axis)."""

    def value(record: RunRecord, key: str) -> str:
        setting = table.settings[record.name].get(key)
        return "-" if setting is None else format_value(setting)

    labels = [", ".join(value(r, k) for k in table.swept) for r in runs]
    if not table.swept or len(set(labels)) < len(labels):  # repeated settings: name the runs
        labels = [
            f"{r.name}: {label}" if label else r.name for r, label in zip(runs, labels, strict=True)
        ]
    heights = [float(r.metrics[metric]) for r in runs]
    width = min(16.0, 5.5 + 0.075 * max(len(label) for label in labels))
    fig = figure or Figure(figsize=(width, max(2.5, 0.3 * len(runs) + 1.5)), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.barh(range(len(runs)), heights, color=_colors(1)[0])
    ax.bar_label(bars, labels=[f"{h:.4g}" for h in heights], padding=3, fontsize="small")
    ax.set_yticks(range(len(runs)), labels, fontsize="small")
    ax.invert_yaxis()  # the table's first row on top
    ax.margins(x=0.15)
    ax.set_xlabel(label or metric)
    ax.set_ylabel(", ".join(table.swept) or "run")
    ax.set_title(f"{label or metric} per run\n{note}", fontsize="medium")
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def plot_search(
    table: SummaryTable, metric: str, keys: Sequence[str], log_keys: Sequence[str] = ()
) -> Figure:
    """A search's metric against each searched value, one axis per searched key (the same
    metric on every axis), the table's first run (the best) marked.

    Args:
        table: from :func:`summary_table`, sorted by ``metric``.
        metric: the searched metric (the search's ``optimized_metric``).
        keys: the searched keys (their runs' values are read from ``table.settings``).
        log_keys: keys searched on a log scale (``tag(log, interval(a,b))``): a log axis.

    Raises:
        ValueError: the metric is in no finished run.
    """
    runs = [r for r in table.records if r.ok and is_number(r.metrics.get(metric))]
    if not runs:
        raise ValueError(f"no finished trial has the metric {metric!r}; nothing to plot")
    fig = Figure(figsize=(4.2 * max(1, len(keys)), 4.0), layout="constrained")
    axes = fig.subplots(1, max(1, len(keys)), squeeze=False)[0]
    color, best_color = _colors(2)
    for ax, key in zip(axes, keys, strict=False):
        values = [table.settings[r.name].get(key) for r in runs]
        ys = [float(r.metrics[metric]) for r in runs]
        if all(is_number(v) for v in values):
            xs = [float(v) for v in values]
            if min(xs) > 0 and (key in log_keys or max(xs) / min(xs) >= 100):
                ax.set_xscale("log")
                log_ticks(ax.xaxis, min(xs), max(xs), most=4)
        else:
            distinct = sorted({format_value(v) for v in values})
            xs = [float(distinct.index(format_value(v))) for v in values]
            ax.set_xticks(range(len(distinct)), distinct)
        ax.scatter(xs, ys, color=color, s=30, label="trial")
        ax.scatter(xs[:1], ys[:1], color=best_color, s=90, marker="*", label="best")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{metric} of {len(runs)} trials against each searched value", fontsize="medium")
    return fig


# --------------------------------------------------------------------------------------------
# Files


def write_summary(
    table: SummaryTable,
    out_dir: str | Path,
    metric: str | None = None,
    x: str | None = None,
    plot: bool = True,
    connect: bool = True,
) -> list[Path]:
    """Writes ``summary.md``, ``summary.csv`` and ``summary_<metric>.png`` into ``out_dir``.

    The plot is skipped (with a warning) when no finished run has the metric; ``connect``: as
    :func:`plot_one_unit` (False for a search's trials).

    Returns:
        The paths written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("summary.md", table.to_markdown()), ("summary.csv", table.to_csv())):
        (out_dir / name).write_text(text)
        written.append(out_dir / name)
    if plot:
        metric = metric or table.sort_by or (table.metrics[0] if table.metrics else None)
        if metric is not None and any(r.ok and metric in r.metrics for r in table.records):
            path = out_dir / plot_filename(metric)
            plot_summary(table, metric, x, connect=connect).savefig(path, dpi=120)
            written.append(path)
        else:
            log.warning("no finished run has the metric %r: no plot written", metric)
    return written
