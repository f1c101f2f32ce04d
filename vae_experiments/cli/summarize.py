"""``python scripts/summarize.py <sweep dir> [<dir> ...]``: one table of a sweep's runs, and a plot.

Reads every run under the directory (a Hydra multirun ``multirun/<date>/<time>``, a day of runs
``outputs/<date>``, or nested sweeps; several directories or run directories: all of their runs,
named relative to the folder they share), writes ``summary.md``, ``summary.csv`` and
``summary_<metric>.png`` there (or into ``--out``; needed with several directories), and prints
the table. ``--generation`` compares generators: the sample quality ``scripts/evaluate.py``
measured beside each run's likelihood or reconstruction terms, best Fréchet distance first.
``--disentanglement`` (automatic when some run has ``test/disentanglement.mig``): the
disentanglement metrics ``scripts/evaluate.py`` scored on data with factors, per configuration as
the mean and spread over its seeds beside reconstruction and KL (``disentanglement.md``,
``disentanglement.csv``), and one latent traversal per run whose rows name the factor each
latent carries most of (``traversal_<run>.png``).

Exit status: 0 when written (runs that failed or have not finished are listed, with a warning),
1 when the directory holds no run or no run has finished, 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vae_experiments.analysis.sweeps import (
    DISENTANGLEMENT_METRICS,
    collect_runs,
    default_x,
    disentanglement_metrics,
    find_run_dirs,
    format_value,
    generation_metrics,
    plot_search,
    seed_groups,
    seed_report,
    seed_report_csv,
    summary_table,
    write_summary,
)
from vae_experiments.runs.records import RunRecord, evaluation_records, read_run, read_search

log = logging.getLogger("summarize")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python scripts/summarize.py",
        description="Collects the overrides and metrics.json of every run under a sweep "
        "directory into summary.md, summary.csv and a plot of a metric against a swept value.",
    )
    parser.add_argument(
        "sweep_dirs",
        type=Path,
        nargs="+",
        metavar="sweep_dir",
        help="a multirun directory (multirun/<date>/<time>), or any "
        "directory with run directories below it; several: one table of all their runs",
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
    parser.add_argument(
        "--generation",
        action="store_true",
        help="compare generators: the columns test/fd_classifier, test/sample_precision, "
        "test/sample_recall (scripts/evaluate.py) and the ELBO or reconstruction terms (unless "
        "--metrics is given), with the model; sorted by test/fd_classifier unless --sort is given",
    )
    parser.add_argument(
        "--disentanglement",
        action="store_true",
        help="compare disentanglement (automatic when some run has test/disentanglement.mig): "
        "the table's columns are the scores scripts/evaluate.py wrote on data with factors and "
        "reconstruction and KL (unless --metrics is given), sorted by test/disentanglement.mig, "
        "highest first, unless --sort is given; also disentanglement.md/.csv (each "
        "configuration's mean and spread over its seeds) and a latent traversal per run "
        "(traversal_<run>.png) whose rows name the factor each latent carries most of",
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


#: Images per row of a run's latent traversal (as scripts/sample.py draws them).
TRAVERSAL_STEPS = 9


def scored_evaluation(record: RunRecord) -> dict[str, Any] | None:
    """The ``scripts/evaluate.py`` record behind a run's ``test/disentanglement.mig`` in
    metrics.json (the newest evaluation of the test split with that score), or None."""
    mig = record.metrics.get(DISENTANGLEMENT_METRICS[0])
    for _, evaluation in evaluation_records(record.path, "test"):
        scores = evaluation.get("disentanglement") or {}
        if scores.get("mig") == mig:
            return evaluation
    return None


def scoring_settings(evaluation: dict[str, Any]) -> str:
    """How an evaluation scored the codes, in one line."""
    scores = evaluation["disentanglement"]
    settings = scores["settings"]
    dci = settings["dci"]
    return (
        f"{scores['images']} {evaluation['split']} codes; MIG with {settings['mig']['bins']} "
        f"equal-width bins per latent; DCI with a {dci['regressor']} per factor, SAP with "
        f"one-latent linear classifiers, both trained on {dci['num_train']} codes and tested on "
        f"{dci['num_test']}; seed {dci['seed']}"
    )


def write_traversal(record: RunRecord, evaluation: dict[str, Any], path: Path) -> Path:
    """The run's latent traversal (:func:`~vae_experiments.analysis.latent.latent_traversal`
    over the evaluated codes' 5% to 95% quantiles), each row labelled with the factor that
    latent carries most of (the evaluation's normalised mutual information)."""
    from vae_experiments.analysis.disentanglement import factor_row_labels
    from vae_experiments.analysis.latent import encode_split, latent_traversal, traversal_labels
    from vae_experiments.pictures import image_grid, save_grid
    from vae_experiments.runs import load_data, load_run, load_split

    checkpoint = Path(evaluation["checkpoint"])
    # A run moved since its evaluation: the same checkpoint, where the run is now.
    with contextlib.suppress(ValueError):
        checkpoint = record.path / checkpoint.relative_to(evaluation["run"])
    model, cfg = load_run(checkpoint, map_location="cpu")
    data = load_data(cfg)
    images, _ = load_split(data, evaluation["split"], limit=evaluation["disentanglement"]["images"])
    codes = encode_split(model, images.split(data.batch_size))
    rows = latent_traversal(model, codes, steps=TRAVERSAL_STEPS).split(TRAVERSAL_STEPS)
    best = evaluation["disentanglement"]["latent_factor"]["best_factor"]
    labels = factor_row_labels(traversal_labels(codes), best)
    return save_grid(image_grid(list(rows), row_labels=labels), path)


def plural(count: int, noun: str) -> str:
    """``1 run``, ``2 runs``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def write_disentanglement_report(
    table, metrics: list[str], out_dir: Path, traversals: bool = True
) -> tuple[str, list[Path]]:
    """Writes ``disentanglement.md`` and ``disentanglement.csv`` (each configuration's mean and
    spread over its seeds) and, with ``traversals``, ``traversal_<run>.png`` per scored run.

    Returns:
        The report's text, and the paths written.
    """
    groups = seed_groups(table)
    scored = [r for r in table.records if r.ok and DISENTANGLEMENT_METRICS[0] in r.metrics]
    evaluations = {r.name: scored_evaluation(r) for r in scored}
    settings = {scoring_settings(e) for e in evaluations.values() if e is not None}
    if len(settings) == 1:
        how = f"Scored by scripts/evaluate.py on {settings.pop()}."
    elif settings:
        how = "WARNING: the runs were scored with different settings:\n" + "\n".join(
            f"- {s}" for s in sorted(settings)
        )
    else:
        how = "No evaluation record found beside the scores (analysis/evaluate-*/)."
    single = sum(1 for group in groups if len(group.runs) == 1)
    lines = [
        "# Disentanglement over seeds",
        "",
        f"{plural(len(scored), 'scored run')} in {plural(len(groups), 'configuration')} (runs "
        "that differ only in their seed). Each cell: the mean ± the sample standard deviation "
        "over the configuration's seeds (min, max and n in disentanglement.csv). These scores "
        "vary more between seeds than between methods (Locatello et al. 2019): compare "
        "configurations by their spread, not by their means alone.",
        "",
        how,
        "",
        seed_report(groups, metrics),
    ]
    if single:
        lines += [
            f"WARNING: {plural(single, 'configuration')} with a single seed, no spread: train "
            "each with several (python train.py -m ... seed=0,1,2).",
            "",
        ]
    out_dir = Path(out_dir)
    written = []
    if traversals:
        pictures = []
        for record in scored:
            evaluation = evaluations[record.name]
            if evaluation is None:
                log.warning("no traversal of %s: no evaluation record of its scores", record.name)
                continue
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", record.name).strip("._") or "run"
            try:
                path = write_traversal(record, evaluation, out_dir / f"traversal_{name}.png")
            except (OSError, ValueError, KeyError) as err:
                log.warning("no traversal of %s: %s", record.name, err)
                continue
            written.append(path)
            pictures.append(f"- `{record.name}`: {path.name}")
        if pictures:
            lines += [
                "Latent traversals (one row per latent, swept from its 5% to its 95% quantile "
                "over the scored codes, the others at their median; each row names the factor "
                "the latent carries most of, with its normalised mutual information):",
                "",
                *pictures,
                "",
            ]
    text = "\n".join(lines).rstrip() + "\n"
    for name, content in (
        ("disentanglement.md", text),
        ("disentanglement.csv", seed_report_csv(groups, metrics)),
    ):
        (out_dir / name).write_text(content)
        written.insert(0 if name.endswith(".md") else 1, out_dir / name)
    return text, written


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; returns its exit status."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")  # no-op if set
    parser = build_parser()
    args = parser.parse_args(argv)
    metrics = [m for item in args.metrics or [] for m in item.split(",") if m] or None

    for folder in args.sweep_dirs:
        if not folder.is_dir():
            parser.error(f"{folder} is not a directory")
    if len(args.sweep_dirs) > 1 and args.out is None:
        parser.error("several directories: name the folder for the summary with --out DIR")
    args.sweep_dir = args.sweep_dirs[0]
    if len(args.sweep_dirs) == 1:
        records = collect_runs(args.sweep_dir)
    else:  # named relative to the folder they share, each run once
        args.sweep_dir = Path(os.path.commonpath([d.resolve() for d in args.sweep_dirs]))
        runs = {p: None for d in args.sweep_dirs for p in find_run_dirs(d.resolve())}
        records = [read_run(path, args.sweep_dir) for path in runs]
    if not records:
        log.error(
            "no runs under %s: a run directory holds .hydra/config.yaml; pass the directory "
            "that `python train.py -m ...` printed (multirun/<date>/<time>)",
            args.sweep_dir,
        )
        return 1

    search = read_search(args.sweep_dir) if len(args.sweep_dirs) == 1 else None
    keys = [args.x] if args.x is not None else []
    if args.generation:
        try:
            columns = generation_metrics(records)
        except ValueError as err:
            parser.error(str(err))
        metrics = metrics or columns
        if "model" not in keys:
            keys.append("model")  # a column where the runs' models differ
        if args.sort is None:
            args.sort = columns[0]
    # Scores of data with factors: a report over seeds beside the table, asked for or not.
    scored = any(DISENTANGLEMENT_METRICS[0] in r.metrics for r in records)
    disentanglement = None
    if args.disentanglement or (scored and not args.generation):
        try:
            disentanglement = disentanglement_metrics(records)
        except ValueError as err:
            parser.error(str(err))
        if "model" not in keys:
            keys.append("model")
        if args.disentanglement:
            metrics = metrics or disentanglement
            if args.sort is None:
                args.sort, args.descending = disentanglement[0], True
    if args.sort is None:  # hydra/sweeper=optuna: rank by what it optimized
        args.sort = search["optimized_metric"] if search else "test/loss"
        args.descending = args.descending or bool(search and search["direction"] == "maximize")
    try:
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

    report = None
    if disentanglement is not None:
        try:
            report, report_files = write_disentanglement_report(
                table, disentanglement, out_dir, traversals=not args.no_plot
            )
        except OSError as err:
            log.error(
                "cannot write into %s (%s); choose another folder with --out DIR", out_dir, err
            )
            return 1
        written += report_files

    print(table.to_markdown())
    if report is not None:
        print(report)
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
