"""Sweep reports: collecting runs, the table's order and columns, the files, the command."""

from __future__ import annotations

import csv
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, train_run
from vae_experiments.analysis.sweeps import (
    collect_runs,
    format_value,
    parse_override,
    plot_filename,
    plot_search,
    plot_summary,
    summary_table,
    write_summary,
)
from vae_experiments.cli.summarize import main
from vae_experiments.runs import lock

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(
    run_dir: Path,
    overrides: list[str],
    metrics: dict | None = None,
    status: dict | None = None,
    config: dict | None = None,
    choices: dict | None = None,
) -> Path:
    """Writes a run directory as Hydra and train.py lay it out (no checkpoints)."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True)
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (hydra_dir / "config.yaml").write_text(yaml.safe_dump(config or {"seed": 0}))
    if choices is not None:
        hydra = {"hydra": {"runtime": {"choices": {**choices, "hydra/launcher": "basic"}}}}
        (hydra_dir / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    if metrics is not None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, sort_keys=True))
    if status is not None:
        (run_dir / "status.json").write_text(json.dumps(status))
    return run_dir


def vae_metrics(loss: float, **extra) -> dict:
    return {
        "test/loss": loss,
        "test/recon": loss - 1.5,
        "test/recon_mse": loss / 10,
        "test/kl": 1.5,
        "test/elbo": -loss,
        "epochs": 3,
        "steps": 60,
        "train_seconds": 0.25,
        "world_size": 1,
        **extra,
    }


FIXED = ["trainer.max_epochs=3", "++model.network.hidden_dims=[16]", "optimizer.lr=1e-3"]


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A multirun: model x latent_dim, with one job that crashed (no metrics.json), one whose
    status.json says it failed, and a second sweep nested inside."""
    root = tmp_path / "multirun" / "2026-11-25" / "14-03-12"
    losses = {("vae", 2): 30.0, ("vae", 10): 21.0, ("vae", 4): 25.0, ("ae", 2): 27.0}
    for job, ((model, dim), loss) in enumerate(losses.items()):
        make_run(
            root / str(job),
            [f"model={model}", f"model.latent_dim={dim}", *FIXED],
            metrics=vae_metrics(loss) if model == "vae" else {"test/loss": loss, "epochs": 3},
        )
    make_run(root / "4", ["model=ae", "model.latent_dim=10", *FIXED])  # crashed
    make_run(
        root / "5",
        ["model=ae", "model.latent_dim=4", *FIXED],
        status={"status": "failed", "error": "RuntimeError: CUDA out of memory\n(traceback)"},
    )
    (root / "5" / "checkpoints").mkdir()  # not a run: no .hydra inside
    make_run(
        root / "nested" / "0",
        ["model=vae", "model.latent_dim=32", *FIXED],
        metrics=vae_metrics(18.0, **{"test/log_px": -17.0}),
    )
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_parse_override_strips_prefixes_and_types_values():
    assert parse_override("++model.network.hidden_dims=[16, 8]") == (
        "model.network.hidden_dims",
        [16, 8],
    )
    assert parse_override("model/network=mlp") == ("model/network", "mlp")
    assert parse_override("+trainer.limit_train_batches=4") == ("trainer.limit_train_batches", 4)
    assert parse_override("optimizer.lr=1e-3") == ("optimizer.lr", 0.001)
    assert parse_override("trainer.enable_progress_bar=False") == (
        "trainer.enable_progress_bar",
        False,
    )
    assert parse_override("model=vae") == ("model", "vae")
    assert parse_override("data.path=/a/b:c") == ("data.path", "/a/b:c")
    assert parse_override("~callbacks.image_grids") == ("callbacks.image_grids", "<deleted>")
    with pytest.raises(ValueError, match="key=value"):
        parse_override("model")
    assert format_value([8, 16]) == "[8,16]"
    assert format_value(0.001) == "0.001"


def test_collect_runs_reads_every_run_with_its_status(sweep):
    records = {r.name: r for r in collect_runs(sweep)}
    assert list(records) == ["0", "1", "2", "3", "4", "5", "nested/0"]
    first = records["0"]
    assert first.path == sweep / "0"
    assert list(first.overrides.items()) == [
        ("model", "vae"),
        ("model.latent_dim", 2),
        ("trainer.max_epochs", 3),
        ("model.network.hidden_dims", [16]),
        ("optimizer.lr", 0.001),
    ]
    assert first.metrics == vae_metrics(30.0)
    assert (first.status, first.error, first.ok) == ("finished", None, True)
    assert (records["4"].status, records["4"].error, records["4"].ok) == (
        "incomplete",
        "no metrics.json",
        False,
    )
    assert records["4"].metrics == {}
    assert records["5"].status == "failed"
    assert records["5"].error.startswith("RuntimeError: CUDA out of memory")
    assert records["nested/0"].metrics["test/log_px"] == -17.0


def test_status_json_overrides_the_guess_from_metrics(tmp_path):
    make_run(tmp_path / "a", ["seed=1"], metrics={"test/loss": 1.0}, status={"status": "running"})
    make_run(tmp_path / "b", ["seed=2"], status={"status": "finished"})
    writer = lock.acquire(tmp_path / "a")  # running: a live process writes it (else it died)
    records = {r.name: r for r in collect_runs(tmp_path)}
    writer.release()
    assert records["a"].status == "running" and not records["a"].ok
    assert records["b"].status == "finished" and not records["b"].ok
    assert records["b"].error == "no metrics.json"


def test_table_sorts_by_metric_and_puts_failures_last(sweep):
    records = collect_runs(sweep)
    table = summary_table(records, sort_by="test/loss")
    assert [r.name for r in table.records] == ["nested/0", "1", "2", "3", "0", "5", "4"]
    assert table.swept == ["model", "model.latent_dim"]
    assert table.fixed == {
        "trainer.max_epochs": 3,
        "model.network.hidden_dims": [16],
        "optimizer.lr": 0.001,
        "epochs": 3,  # a metric with one value in every finished run
    }
    # failures are ordered by their swept values: ae/4 (job 5) before ae/10 (job 4)
    assert [r.name for r in table.failures] == ["5", "4"]

    descending = summary_table(records, sort_by="test/loss", descending=True)
    assert [r.name for r in descending.records] == ["0", "3", "2", "1", "nested/0", "5", "4"]

    # a metric only some runs have: those runs first, the other finished runs after them
    by_log_px = summary_table(records, sort_by="test/log_px")
    assert [r.name for r in by_log_px.records][:1] == ["nested/0"]
    assert [r.name for r in by_log_px.records][-2:] == ["5", "4"]


def test_ties_follow_swept_values_numerically(tmp_path):
    for job, (lr, dim) in enumerate([(0.1, 10), (0.01, 2), (0.1, 2), (0.01, 4), (0.1, 4)]):
        make_run(
            tmp_path / str(job),
            [f"model.latent_dim={dim}", f"optimizer.lr={lr}"],
            metrics={"test/loss": 5.0},
        )
    table = summary_table(collect_runs(tmp_path))
    settings = [
        (table.settings[r.name]["model.latent_dim"], table.settings[r.name]["optimizer.lr"])
        for r in table.records
    ]
    # numeric order (a string sort would put 10 before 2 and 4)
    assert settings == [(2, 0.01), (2, 0.1), (4, 0.01), (4, 0.1), (10, 0.1)]


def test_metric_columns_default_and_chosen(sweep):
    records = collect_runs(sweep)
    table = summary_table(records, sort_by="test/recon_mse")
    assert table.metrics == [
        "test/recon_mse",
        "test/elbo",
        "test/kl",
        "test/log_px",
        "test/loss",
        "test/recon",
        "steps",
        "train_seconds",
        "world_size",
    ]
    assert table.fixed["epochs"] == 3  # the same in every finished run: not a column
    chosen = summary_table(records, metrics=["test/loss", "test/k*", "epochs"])
    assert chosen.metrics == ["test/loss", "test/kl", "epochs"]
    assert chosen.columns == ["run", "model", "model.latent_dim", *chosen.metrics, "status"]
    with pytest.raises(ValueError, match=r"test/nll.*test/elbo"):
        summary_table(records, sort_by="test/nll")
    with pytest.raises(ValueError, match="no run has a metric 'val/loss'"):
        summary_table(records, metrics=["val/loss"])


def test_a_key_only_some_runs_override_comes_from_their_config(tmp_path):
    """A directory of single runs: `python train.py model.latent_dim=8`, then `python train.py`."""
    make_run(
        tmp_path / "10-00-00",
        ["model=ae", "model.latent_dim=8"],
        metrics={"test/loss": 2.0},
        config={"model": {"latent_dim": 8, "network": {"channels": [8, 16]}}, "seed": 0},
        choices={"model": "ae"},
    )
    make_run(
        tmp_path / "11-00-00",
        [],
        metrics={"test/loss": 1.0},
        config={"model": {"latent_dim": 16, "network": {"channels": [8, 16]}}, "seed": 0},
        choices={"model": "vae"},
    )
    table = summary_table(collect_runs(tmp_path))
    assert table.swept == ["model", "model.latent_dim"]
    rows = table.rows()
    assert [(r["run"], r["model"], r["model.latent_dim"]) for r in rows] == [
        ("11-00-00", "vae", 16),
        ("10-00-00", "ae", 8),
    ]


def test_markdown_and_csv(sweep):
    table = summary_table(collect_runs(sweep), sort_by="test/loss")
    markdown = table.to_markdown()
    lines = markdown.splitlines()
    assert (
        lines[0]
        == "fixed: trainer.max_epochs=3, model.network.hidden_dims=[16], optimizer.lr=0.001, "
        "epochs=3"
    )
    header = next(line for line in lines if line.startswith("| run"))
    assert header.split(" | ")[1:3] == ["model", "model.latent_dim"]
    first_row = lines[lines.index(header) + 2]
    assert first_row.startswith("| nested/0 | vae | 32 | 18 |")
    assert "## Failed or unfinished runs" in markdown
    failures = markdown.split("## Failed or unfinished runs")[1]
    assert "`4`" in failures and "incomplete: no metrics.json" in failures
    assert "`5`" in failures and "failed: RuntimeError: CUDA out of memory (traceback)" in failures

    rows = list(csv.DictReader(io.StringIO(table.to_csv())))
    assert [row["run"] for row in rows] == [r.name for r in table.records]
    by_run = {row["run"]: row for row in rows}
    assert float(by_run["1"]["test/loss"]) == 21.0
    assert float(by_run["1"]["test/recon_mse"]) == 2.1  # full precision, not the 5 digits shown
    assert by_run["1"]["model.latent_dim"] == "10" and by_run["1"]["model"] == "vae"
    assert by_run["3"]["test/kl"] == ""  # the AE has no KL
    assert by_run["4"]["test/loss"] == "" and by_run["4"]["status"] == "incomplete"
    assert by_run["4"]["error"] == "no metrics.json"
    assert by_run["5"]["status"] == "failed"


def test_plot_one_line_per_other_swept_value(sweep):
    table = summary_table(collect_runs(sweep))
    figure = plot_summary(table, metric="test/loss")
    (axes,) = figure.axes
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert set(lines) == {"ae", "vae"}
    assert list(lines["vae"].get_xdata()) == [2, 4, 10, 32]
    assert list(lines["vae"].get_ydata()) == [30.0, 25.0, 21.0, 18.0]
    assert axes.get_xscale() == "linear"  # 2..32 spans less than two orders of magnitude
    assert axes.get_xlabel() == "model.latent_dim" and axes.get_ylabel() == "test/loss"
    with pytest.raises(ValueError, match="not a swept key; swept keys: model, model.latent_dim"):
        plot_summary(table, x="seed")


def ae_and_vae_runs(root: Path) -> Path:
    """An AE's loss (squared error) and a VAE's (nats) at latent sizes 2 and 8; the AE's are
    the smaller numbers, and recon_mse ranks the latent sizes 8 first."""
    likelihoods = {"ae": "SquaredError", "vae": "DiscretizedLogistic"}
    for model, dims in (("ae", (2, 8)), ("vae", (2, 8))):
        for dim in dims:
            make_run(
                root / f"{model}{dim}",
                [f"model={model}", f"model.latent_dim={dim}"],
                metrics={
                    "test/loss": dim * (100.0 if model == "vae" else 1.0),
                    "test/kl": 1.0,
                    "test/recon_mse": 1.0 / dim + (0.01 if model == "vae" else 0.0),
                },
                config={
                    "model": {"likelihood": {"_target_": f"m.likelihoods.{likelihoods[model]}"}}
                },
            )
    return root


def test_a_loss_in_nats_and_one_in_squared_error_are_sorted_apart(tmp_path):
    table = summary_table(collect_runs(ae_and_vae_runs(tmp_path)))  # test/loss, the default
    assert [r.name for r in table.records] == ["vae2", "vae8", "ae2", "ae8"]
    assert table.columns[:2] == ["run", "unit"]
    rows = table.rows()
    assert [row["unit"] for row in rows] == ["discretized_logistic"] * 2 + ["squared_error"] * 2
    heading = table.to_markdown().splitlines()[2]
    assert heading.startswith(
        "4 runs (sorted by test/loss, ascending, within each unit (discretized_logistic, "
        "squared_error): one likelihood's do not rank against another's; --sort test/recon_mse "
        "ranks every run)"
    )
    assert next(csv.reader(io.StringIO(table.to_csv())))[:2] == ["run", "unit"]
    # A metric in one unit in every run ranks them all.
    shared = summary_table(collect_runs(tmp_path), sort_by="test/recon_mse")
    assert [r.name for r in shared.records] == ["ae8", "vae8", "ae2", "vae2"]
    assert not shared.units and "unit" not in shared.columns


def test_a_loss_in_nats_and_one_in_squared_error_get_an_axis_each(tmp_path):
    table = summary_table(collect_runs(ae_and_vae_runs(tmp_path)))
    assert table.metrics[0] == "test/loss" and table.fixed["test/kl"] == 1.0
    figure = plot_summary(table, metric="test/loss")
    labels = sorted(axes.get_ylabel() for axes in figure.axes)
    assert labels == ["test/loss [discretized_logistic (vae)]", "test/loss [squared_error (ae)]"]
    for axes in figure.axes:
        assert len(axes.get_lines()) == 1  # one model per axis
    (kl_axes,) = plot_summary(table, metric="test/kl").axes  # nats for both: one axis


def test_plot_log_scale_and_bar_chart(tmp_path):
    for job, lr in enumerate([1e-4, 1e-3, 1e-2]):
        make_run(tmp_path / "lr" / str(job), [f"optimizer.lr={lr}"], metrics={"test/loss": lr})
    table = summary_table(collect_runs(tmp_path / "lr"))
    (axes,) = plot_summary(table).axes
    assert axes.get_xscale() == "log"
    assert axes.get_legend() is None  # a single line
    for job, k in enumerate([1, 5, 50]):  # IWAE's samples per image, as Burda et al. sweep them
        make_run(tmp_path / "k" / str(job), [f"model.k={k}"], metrics={"test/loss": -k})
    (axes,) = plot_summary(summary_table(collect_runs(tmp_path / "k"))).axes
    assert axes.get_xscale() == "log"

    for job, model in enumerate(["ae", "vae", "linear_ae"]):
        make_run(tmp_path / "models" / str(job), [f"model={model}"], metrics={"test/loss": job})
    table = summary_table(collect_runs(tmp_path / "models"))
    (axes,) = plot_summary(table).axes
    labels = [t.get_text() for t in axes.get_yticklabels()]
    assert labels == ["ae", "vae", "linear_ae"]  # table order, best on top
    assert axes.get_ylabel() == "model"
    assert [p.get_width() for p in axes.patches] == [0, 1, 2]
    assert plot_filename("test/recon mse") == "summary_test_recon_mse.png"


def test_write_summary_files(sweep, tmp_path):
    table = summary_table(collect_runs(sweep), sort_by="test/recon_mse")
    written = write_summary(table, tmp_path / "out")
    assert [p.name for p in written] == ["summary.md", "summary.csv", "summary_test_recon_mse.png"]
    assert written[2].read_bytes()[:8] == PNG_MAGIC


def test_command_writes_and_prints_the_summary(sweep, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        code = main([str(sweep), "--sort", "test/elbo", "--descending"])
    assert code == 0
    assert "2 of 7 runs have no results" in caplog.text
    out = capsys.readouterr().out
    assert "| run | model | model.latent_dim | test/elbo |" in out
    for name in ("summary.md", "summary.csv", "summary_test_elbo.png"):
        assert f"wrote {sweep / name}" in out
        assert (sweep / name).is_file()
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [float(r["test/elbo"]) for r in rows if r["test/elbo"]] == [-18.0, -21.0, -25.0, -30.0]
    assert (sweep / "summary_test_elbo.png").read_bytes()[:8] == PNG_MAGIC


def test_command_exit_codes(sweep, tmp_path, caplog, capsys):
    empty = tmp_path / "empty"
    (empty / "not_a_run").mkdir(parents=True)
    assert main([str(empty)]) == 1
    assert "no runs under" in caplog.text

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing")])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main([str(sweep), "--sort", "test/nll"])
    assert exit_info.value.code == 2
    assert "cannot sort by 'test/nll'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main([str(sweep), "--x", "seed"])
    assert exit_info.value.code == 2
    assert "'seed' is not a swept key" in capsys.readouterr().err

    failed = tmp_path / "all_failed"
    make_run(failed / "0", ["model=ae"])
    make_run(failed / "1", ["model=vae"], status={"status": "failed", "error": "boom"})
    assert main([str(failed), "--out", str(tmp_path / "report")]) == 1
    assert "boom" in (tmp_path / "report" / "summary.md").read_text()


def test_script_runs_as_users_type_it(sweep, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "summarize.py"), str(sweep), "--no-plot"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "| nested/0 | vae | 32 |" in result.stdout
    assert "WARNING: 2 of 7 runs have no results" in result.stderr
    assert not list(sweep.glob("*.png"))


def test_summary_of_a_real_tiny_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    for job, dim in enumerate([2, 5]):
        overrides = [
            "model=ae",
            "model/network=mlp",
            "model.network.hidden_dims=[16]",
            "logger=none",
            f"model.latent_dim={dim}",
            "trainer.max_epochs=1",
        ]
        run_dir = train_run(sweep / str(job), overrides)
        (run_dir / ".hydra").mkdir()  # what Hydra records of the command line
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    table = summary_table(collect_runs(sweep), sort_by="test/recon_mse")
    assert table.swept == ["model.latent_dim"]
    assert table.fixed["model"] == "ae" and table.fixed["model/network"] == "mlp"
    assert table.fixed["model.network.hidden_dims"] == [16]
    for record in table.records:
        metrics = json.loads((record.path / "metrics.json").read_text())
        assert record.ok and record.metrics == metrics
        assert table.settings[record.name]["model.latent_dim"] == [2, 5][int(record.name)]
    mse = [r.metrics["test/recon_mse"] for r in table.records]
    assert mse == sorted(mse)
    assert main([str(sweep), "--sort", "test/recon_mse"]) == 0
    assert (sweep / "summary_test_recon_mse.png").is_file()


def test_posterior_gap_against_a_config_key_that_presets_set(tmp_path, capsys):
    """Runs made with experiment= presets set model.k without an override: --x model.k reads it
    from each run's config, and the preset names (one per k) do not split the line."""
    gaps = {"burda_vae_1layer": (1, 30.0), "burda_iwae_k5": (5, 34.0), "burda_iwae_k50": (50, 38.0)}
    for name, (k, gap) in gaps.items():
        make_run(
            tmp_path / name,
            [f"experiment={name}", "data=fashion_mnist", "trainer.max_epochs=1"],
            metrics={"test/loss": 250.0 - k / 10, "test/posterior_gap": gap},
            config={"model": {"k": k}, "seed": 0},
        )
    table = summary_table(collect_runs(tmp_path), keys=["model.k"])
    assert table.swept == ["model.k", "experiment"]
    assert [r["model.k"] for r in table.rows()] == [50, 5, 1]  # by test/loss
    (axes,) = plot_summary(table, metric="test/posterior_gap", x="model.k").axes
    (line,) = axes.get_lines()
    assert list(line.get_xdata()) == [1, 5, 50] and list(line.get_ydata()) == [30.0, 34.0, 38.0]

    out = tmp_path / "report"
    args = [str(tmp_path), "--x", "model.k", "--metric", "test/posterior_gap", "--out", str(out)]
    assert main(args) == 0
    assert "plot: test/posterior_gap against model.k" in capsys.readouterr().out
    assert (out / "summary_test_posterior_gap.png").read_bytes()[:8] == PNG_MAGIC
    assert "| burda_iwae_k50 | 50 | burda_iwae_k50 |" in (out / "summary.md").read_text()


def test_a_random_searchs_draws_are_points_with_ticks_that_do_not_run_together(tmp_path):
    # model.beta and optimizer.lr as a search draws them: each trial its own pair.
    draws = [(3.677, 0.00196), (3.782, 0.00608), (4.616, 0.00269), (5.021, 0.00123)]
    draws += [(6.438, 0.00114), (7.727, 0.000585)]
    for job, (beta, lr) in enumerate(draws):
        overrides = [f"model.beta={beta}", f"optimizer.lr={lr}"]
        make_run(tmp_path / str(job), overrides, metrics={"test/elbo": -beta})
    table = summary_table(collect_runs(tmp_path), sort_by="test/elbo", descending=True)
    for connect in (True, False):  # joined by no line, whether or not summarize knows a search
        (axes,) = plot_summary(table, x="model.beta", connect=connect).axes
        (points,) = axes.get_lines()
        assert points.get_linestyle() == "None" and len(points.get_xdata()) == 6
        ticks = [t.get_text() for t in axes.get_xticklabels()]
        assert "3.677" not in ticks and "3.782" not in ticks  # evenly spaced, not one per draw

    figure = plot_search(table, "test/elbo", ["model.beta", "optimizer.lr"], ["optimizer.lr"])
    lr_axes = figure.axes[1]
    assert lr_axes.get_xscale() == "log"
    assert [t.get_text() for t in lr_axes.get_xticklabels()] == ["0.001", "0.002", "0.005"]
    assert {t.get_text() for t in lr_axes.get_xticklabels(minor=True)} <= {""}


def test_a_grids_values_label_their_ticks(sweep):
    (axes,) = plot_summary(summary_table(collect_runs(sweep)), metric="test/loss").axes
    assert [t.get_text() for t in axes.get_xticklabels()] == ["2", "4", "10", "32"]
    assert {line.get_linestyle() for line in axes.get_lines()} == {"-"}
