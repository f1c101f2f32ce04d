"""``python scripts/summarize.py <sweep dir>``: one table of a sweep's runs, and a plot.

Reads every run under the directory (a Hydra multirun ``multirun/<date>/<time>``, a day of runs
``outputs/<date>``, or nested sweeps), writes ``summary.md``, ``summary.csv`` and
``summary_<metric>.png`` there (or into ``--out``), and prints the table.

Exit status: 0 when written (runs that failed or have not finished are listed, with a warning),
1 when the directory holds no run or no run has finished, 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from vae_experiments.analysis.sweeps import (
    collect_runs,
    default_x,
    format_value,
    plot_search,
    summary_table,
    write_summary,
)
from vae_experiments.runs.records import read_search

log = logging.getLogger("summarize")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python scripts/summarize.py",
        description="Collects the overrides and metrics.json of every run under a sweep "
        "directory into summary.md, summary.csv and a plot of a metric against a swept value.",
    )
    parser.add_argument(
        "sweep_dir",
        type=Path,
        help="a multirun directory (multirun/<date>/<time>), or any "
        "directory with run directories below it",
    )
    parser.add_argument(
        "--sort",
        metavar="METRIC",
        help="order runs by this metric (default: a search's optimized_metric, in its "
        "direction; else test/loss, lowest first)",
    )
    parser.add_argument(
        "--descending", action="store_true", help="highest first (e.g. --sort test/elbo)"
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        metavar="METRIC",
        help="metric columns, names or patterns ('test/*'); default: every metric of any run",
    )
    parser.add_argument(
        "--metric", metavar="METRIC", help="the metric to plot (default: the --sort metric)"
    )
    parser.add_argument(
        "--x",
        metavar="KEY",
        help="the swept key on the plot's x-axis, an override or any config key whose value "
        "differs between runs (model.k); default: the first swept key with numeric values; "
        "with none, a bar per run",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="where to write the files (default: the sweep directory)",
    )
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    return parser


def best_trial_lines(table, search: dict, metric: str) -> str:
    """The best finished trial of a search, and the command line that trains its config."""
    best = next((r for r in table.records if r.ok and metric in r.metrics), None)
    if best is None:
        return "best trial: none finished"
    values = {k: table.settings[best.name].get(k) for k in search["searched"]}
    searched = [
        f"{k}={v!r}" if isinstance(v, float) else f"{k}={format_value(v)}"
        for k, v in values.items()
    ]
    command = " ".join(["python train.py", *search.get("fixed", []), *searched])
    return (
        f"best trial: {best.name} ({metric}={format_value(best.metrics[metric])}, "
        f"{search['direction']}d over {len(table.records)} trials)\n"
        f"best config: {command}\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns its exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")  # no-op if set
    parser = build_parser()
    args = parser.parse_args(argv)
    metrics = [m for item in args.metrics or [] for m in item.split(",") if m] or None

    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a directory")
    records = collect_runs(args.sweep_dir)
    if not records:
        log.error(
            "no runs under %s: a run directory holds .hydra/config.yaml; pass the directory "
            "that `python train.py -m ...` printed (multirun/<date>/<time>)",
            args.sweep_dir,
        )
        return 1

    search = read_search(args.sweep_dir)  # hydra/sweeper=optuna: rank by what it optimized
    if args.sort is None:
        args.sort = search["optimized_metric"] if search else "test/loss"
        args.descending = args.descending or bool(search and search["direction"] == "maximize")
    try:
        keys = [args.x] if args.x is not None else []
        table = summary_table(records, args.sort, args.descending, metrics, keys)
    except ValueError as err:
        parser.error(str(err))
    metric = args.metric or args.sort
    if not args.no_plot:
        if args.x is not None and args.x not in table.swept:
            parser.error(
                f"--x {args.x!r} is not a swept key (no override, and the same value or none "
                f"in every run's config); swept keys: {', '.join(table.swept) or 'none'}"
            )
        if args.metric is not None and not any(args.metric in r.metrics for r in records):
            found = sorted({k for r in records for k in r.metrics})
            parser.error(
                f"no run has the metric {args.metric!r}; metrics found: {', '.join(found)}"
            )

    out_dir = args.out or args.sweep_dir
    try:
        # A search's trials are points, never a curve.
        plot = not args.no_plot
        written = write_summary(table, out_dir, metric, args.x, plot, connect=search is None)
    except OSError as err:
        log.error("cannot write into %s (%s); choose another folder with --out DIR", out_dir, err)
        return 1

    if search and not args.no_plot and any(r.ok and args.sort in r.metrics for r in records):
        path = Path(out_dir) / "summary_search.png"
        log_keys = [key for key, typed in search["searched"].items() if "log" in str(typed)]
        plot_search(table, args.sort, list(search["searched"]), log_keys).savefig(path, dpi=120)
        written.append(path)

    print(table.to_markdown())
    if search:
        print(best_trial_lines(table, search, args.sort))
    if not args.no_plot and any(p.suffix == ".png" for p in written):
        x = args.x or default_x(table)
        print(f"plot: {metric} against {x}" if x else f"plot: {metric} per run (no numeric key)")
    for path in written:
        print(f"wrote {path}")

    failures = table.failures
    if len(failures) == len(records):
        log.error("none of the %d runs under %s has finished", len(records), args.sweep_dir)
        return 1
    if failures:
        log.warning(
            "%d of %d runs have no results (%s); see 'Failed or unfinished runs' in %s",
            len(failures),
            len(records),
            ", ".join(f"{r.name}: {r.status}" for r in failures[:5])
            + (", ..." if len(failures) > 5 else ""),
            Path(out_dir) / "summary.md",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
