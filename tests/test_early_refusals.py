"""Mistakes that a command finds before it works: one ``error:`` line naming the key, the value
and the fix, exit status 2, no traceback, and nothing left on disk that blocks the corrected
command, which then works. Run as a user runs them, in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from vae_experiments.config_checks import mlflow_store, unwritable_reason

# One short epoch of a small MLP model: the corrected commands take seconds.
QUICK = [
    "model/network=mlp",
    "model.network.hidden_dims=[16]",
    "trainer=cpu",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python <script> <args>`` in ``cwd``, as a user types it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def refused(result: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a command that must have refused with exit status 2."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ------------------------------------------------------------------------------------------------
# An MLflow store that cannot be written


@pytest.mark.parametrize(
    ("store", "expected"),
    [
        ("sqlite:///outputs/mlflow.db", ("outputs/mlflow.db", True)),
        ("sqlite:////abs/mlflow.db", ("/abs/mlflow.db", True)),
        ("sqlite:////abs/mlflow.db?timeout=5", ("/abs/mlflow.db", True)),
        ("sqlite://", None),
        ("sqlite:///:memory:", None),
        ("file:///abs/mlruns", ("/abs/mlruns", False)),
        ("mlruns", ("mlruns", False)),
        ("/abs/mlruns", ("/abs/mlruns", False)),
        ("http://host:5000", None),
        ("https://host", None),
        ("postgresql://user@host/db", None),
        ("databricks", None),
        ("", None),
    ],
)
def test_mlflow_store_is_the_local_file_or_folder_of_a_tracking_uri(
    store, expected, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # a relative store is taken from the working directory
    found = mlflow_store(store)
    if expected is None:
        assert found is None
    else:
        assert found == (tmp_path / expected[0], expected[1])


def test_unwritable_reason_names_what_cannot_be_written(tmp_path):
    (tmp_path / "a_file").write_text("")
    assert unwritable_reason(tmp_path / "new" / "deeper" / "mlflow.db", True) is None
    assert unwritable_reason(tmp_path / "a_file", True) is None  # an existing database
    assert "is a file, not a folder" in unwritable_reason(tmp_path / "a_file" / "m.db", True)
    assert "is a folder, not a file" in unwritable_reason(tmp_path, True)
    assert list(tmp_path.iterdir()) == [tmp_path / "a_file"]  # the check leaves nothing
    if sys.platform.startswith("linux"):  # no one, root neither, creates files in /proc
        assert "no file can be created in /proc" in unwritable_reason(Path("/proc/m.db"), True)
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root writes into read-only folders
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o555)
        try:
            reason = unwritable_reason(read_only / "mlflow.db", True)
            assert reason == f"no file can be created in {read_only} (Permission denied)"
        finally:
            read_only.chmod(0o755)


def refuse_mlflow_store(tmp_path: Path, database: Path, command: list[str]) -> None:
    """Runs ``train.py`` with ``database`` as MLflow's store and asserts the refusal."""
    before = files_under(tmp_path)
    result = run(
        "train.py", [*command, f"logger.mlflow.tracking_uri=sqlite:///{database}"], tmp_path
    )
    error = refused(result)
    assert error.startswith(f"error: logger.mlflow.tracking_uri=sqlite:///{database} is invalid")
    assert str(database) in error and "logger.mlflow.tracking_uri=http://host:5000" in error
    assert files_under(tmp_path) == before  # no run folder, no outputs/, no database


def test_an_mlflow_store_that_cannot_be_written_is_refused_before_training(tmp_path):
    """A path through a file: refused as a read-only folder is (unwritable_reason's test)."""
    pytest.importorskip("mlflow")
    (tmp_path / "a_file").write_text("")
    command = ["logger=mlflow", "hydra.run.dir=runs/tracked"]
    refuse_mlflow_store(tmp_path, tmp_path / "a_file" / "mlflow.db", command)


@pytest.mark.slow  # MLflow creates its database: ~30 s on two loaded cores
def test_the_corrected_mlflow_store_then_trains_into_the_same_folder(tmp_path):
    pytest.importorskip("mlflow")
    (tmp_path / "a_file").write_text("")
    command = ["logger=mlflow", *QUICK, "hydra.run.dir=runs/tracked"]
    refuse_mlflow_store(tmp_path, tmp_path / "a_file" / "mlflow.db", command)
    good = f"sqlite:///{tmp_path}/store/mlflow.db"
    result = run("train.py", [*command, f"logger.mlflow.tracking_uri={good}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "runs" / "tracked" / "metrics.json").is_file()
    assert (tmp_path / "store" / "mlflow.db").is_file()


# ------------------------------------------------------------------------------------------------
# compare_pca.py, evaluate.py and sample.py: refused before anything is written

# compare_pca.py with PCA alone: the corrected command takes seconds.
PCA_ONLY = ["~methods.linear_ae", "~methods.ae_mlp", "~methods.ae_conv"]


def test_compare_pca_refuses_before_it_fits_or_trains_and_leaves_nothing(tmp_path):
    result = run("scripts/compare_pca.py", ["latent_dims=[0]"], tmp_path)
    expected = "error: latent_dims=[0] is invalid: must be a non-empty list of integers >= 1"
    assert refused(result).startswith(expected)
    assert list(tmp_path.iterdir()) == []  # no outputs/compare_pca/<date>/<time>/
    # A folder of the command line that exists (empty) is left as it was.
    (tmp_path / "report").mkdir()
    result = run("scripts/compare_pca.py", ["latent_dims=[0]", "hydra.run.dir=report"], tmp_path)
    assert refused(result).startswith(expected)
    assert files_under(tmp_path) == {"report"}


@pytest.mark.slow  # three commands
def test_compare_pca_corrected_runs_in_the_folder_the_refused_one_named(tmp_path):
    for args in (["latent_dims=[0]"], ["latent_dims=[2]", *PCA_ONLY]):
        result = run("scripts/compare_pca.py", [*args, "hydra.run.dir=new/report"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "new" / "report" / "comparison.csv").is_file()
    assert not (tmp_path / "new" / "report" / "lock.json").exists()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["num_images=0"], "num_images=0 is invalid: must be an integer >= 1"),
        (["latent_dims=[]"], "latent_dims=[] is invalid: must be a non-empty list"),
        (["latent_dims=[2,a]"], "latent_dims=[2, a] is invalid: must be a non-empty list"),
        (
            ["methods.ae_mlp=['model=ae','model.latent_dims=3']"],
            "methods.ae_mlp: [model=ae,model.latent_dims=3]: model.latent_dims is not a config "
            "key: did you mean `model.latent_dim`?",
        ),
        (["methods.ae_mlp=['model=vae','model.beta=-1']"], "methods.ae_mlp: model.beta=-1 is"),
        (["methods.ae_mlp=['data.batch_size=0']"], "methods.ae_mlp: data.batch_size=0 is"),
        (["trainer.max_epochs=-2"], "methods.ae_mlp: trainer.max_epochs=-2 is invalid"),
        (["latent_dims=[2,65]"], "latent_dims=[2, 65] is invalid: PCA of these 1294 training"),
    ],
)
def test_compare_pca_checks_the_whole_comparison_before_it_trains(overrides, expected, tmp_path):
    from hydra import compose, initialize_config_dir

    from vae_experiments.cli.compare_pca import compare
    from vae_experiments.configs import CONFIG_DIR
    from vae_experiments.targets import ConfigError

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("compare_pca", overrides=overrides)
        with pytest.raises(ConfigError) as refusal:
            compare(cfg, tmp_path)
    assert str(refusal.value).startswith(expected)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def vae_run(trained_runs, tmp_path) -> Path:
    """A copy of a small trained VAE: its analysis/ folder is the test's."""
    return Path(shutil.copytree(trained_runs("vae"), tmp_path / "run"))


def test_evaluate_refuses_before_it_writes(vae_run, tmp_path):
    before = files_under(vae_run)
    result = run("scripts/evaluate.py", [f"run={vae_run}", "k=0"], tmp_path)
    assert refused(result) == "error: k must be an integer >= 1, got k=0"
    assert files_under(vae_run) == before  # no analysis/ (empty or not)


def test_sample_of_an_autoencoders_prior_leaves_nothing(trained_runs, tmp_path):
    """Refused once the checkpoint is read: the call's folder and analysis/ go again."""
    run_dir = Path(shutil.copytree(trained_runs("ae"), tmp_path / "run"))
    before = files_under(run_dir)
    result = run("scripts/sample.py", [f"run={run_dir}", "density=prior"], tmp_path)
    assert refused(result).startswith("error: density=prior is only for models trained with one")
    assert files_under(run_dir) == before


@pytest.mark.slow  # two commands
def test_sample_corrected_runs_after_a_refusal(trained_runs, tmp_path):
    run_dir = Path(shutil.copytree(trained_runs("ae"), tmp_path / "run"))
    for density in ("prior", "gmm"):
        result = run("scripts/sample.py", [f"run={run_dir}", f"density={density}", "n=4"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in (run_dir / "analysis").iterdir()] == ["sample-best-gmm-c10"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["k=many"], "k must be an integer >= 1, got k=many"),
        (["split=tset"], "split must be train, val or test, got split=tset"),
        (["checkpoint=bset"], "checkpoint must be best or last, got checkpoint=bset"),
        (["seed=-1"], "seed must be an integer >= 0, got seed=-1"),
        (["eval.batch_size=-1"], "eval.batch_size must be null (the run's data.batch_size) or"),
        (["eval.max_batch_elems=0"], "eval.max_batch_elems must be null (chosen for the device)"),
        (["max_images=0"], "max_images must be null (the whole split) or an integer >= 1"),
    ],
)
def test_evaluate_checks_its_settings_before_it_reads_the_run(overrides, expected, vae_run):
    from hydra import compose, initialize_config_dir

    from vae_experiments.cli.common import UsageError
    from vae_experiments.cli.evaluate import evaluate
    from vae_experiments.configs import CONFIG_DIR

    before = files_under(vae_run)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"run={vae_run}", "device=cpu", *overrides])
    with pytest.raises(UsageError) as refusal:
        evaluate(cfg)
    assert str(refusal.value).startswith(expected)
    assert files_under(vae_run) == before


def test_evaluate_of_an_autoencoder_without_sample_quality_is_a_usage_error(trained_runs):
    from hydra import compose, initialize_config_dir

    from vae_experiments.cli.common import UsageError
    from vae_experiments.cli.evaluate import evaluate
    from vae_experiments.configs import CONFIG_DIR

    run_dir = trained_runs("ae")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        # quality.samples=0: no sample quality either (an AE's samples are measured by default)
        cfg = compose("evaluate", overrides=[f"run={run_dir}", "device=cpu", "quality.samples=0"])
    with pytest.raises(UsageError, match="needs a VAE.*quality.samples=0 leaves nothing"):
        evaluate(cfg)
    assert not (run_dir / "analysis").exists()


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"n": 0}, "n must be an integer >= 1, got n=0"),
        ({"components": 0}, "components must be an integer >= 1, got components=0"),
        ({"density": "gmn"}, "density must be one of auto, diag_gaussian, gmm, prior"),
        ({"checkpoint": "bset"}, "checkpoint must be best or last"),
        ({"traversal_steps": 1}, "traversal_steps must be an integer >= 2"),
        ({"traversal_dims": 0}, "traversal_dims must be null (all of them) or an integer >= 1"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
    ],
)
def test_sample_checks_its_settings_before_it_reads_the_run(settings, expected, vae_run):
    from vae_experiments.cli.common import UsageError
    from vae_experiments.cli.sample import sample_latents

    before = files_under(vae_run)
    with pytest.raises(UsageError) as refusal:
        sample_latents(vae_run, **{"device": "cpu", **settings})
    assert str(refusal.value).startswith(expected)
    assert files_under(vae_run) == before


# ------------------------------------------------------------------------------------------------
# Keys of the old flat configs (every spelling: tests/test_did_you_mean.py)


def test_an_old_data_key_added_as_hydra_advises_is_one_line_and_the_fix_trains(tmp_path):
    """Hydra answers ``data.image_size=8`` with "use +data.image_size=8": that gets what the
    key became, not "did you mean data.batch_size", and the command it names trains."""
    small = ["data=synthetic", "data.source.num_train=64", "data.source.num_val=16"]
    command = [*small, "data.source.num_test=16", *QUICK, "hydra.run.dir=runs/small"]
    result = run("train.py", [*command, "+data.image_size=8"], tmp_path)
    assert refused(result) == (
        "error: data.image_size is no longer a config key: data=synthetic makes images of the "
        "shape data.source.image_shape=[channels,height,width]; data.source.image_size is a key "
        "of data=celeba or data=image_folder"
    )
    assert list(tmp_path.iterdir()) == []
    result = run("train.py", [*command, "data.source.image_shape=[1,8,8]"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "runs" / "small" / "metrics.json").is_file()
