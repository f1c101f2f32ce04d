"""Disentanglement metrics (MIG, DCI, SAP) on codes whose answer is known, each checked against a
small computation of its own."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vae_experiments.analysis.disentanglement import (
    SCORE_KEYS,
    best_factors,
    dci,
    dci_from_importance,
    discretize,
    disentanglement_scores,
    factor_entropies,
    latent_factor_scores,
    mig,
    mutual_information_matrix,
    sap,
)

SIZES = (2, 3, 4)  # values per factor: small, so the tests are fast and the trees learn them


def grid_factors(n: int, seed: int = 0, sizes: tuple[int, ...] = SIZES) -> np.ndarray:
    """(n, F) random value indices of factors with ``sizes`` values."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, s, n) for s in sizes], axis=1)


def noisy_codes(factors: np.ndarray, noise: float = 0.02, seed: int = 1) -> np.ndarray:
    """Codes that are the factors (scaled to [0, 1]) plus small Gaussian noise: (n, F)."""
    rng = np.random.default_rng(seed)
    scaled = factors / np.maximum(factors.max(0), 1)
    return scaled + noise * rng.standard_normal(factors.shape)


def rotation(dim: int, seed: int = 2) -> np.ndarray:
    """A random orthogonal (dim, dim) matrix with no near-zero entry's worth of alignment."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
    return q


# --------------------------------------------------------------------------------------------
# Mutual information, by hand


def hand_mi(a: list[int], b: list[int]) -> float:
    """MI in nats from the definition, summing over the pairs of values."""
    n = len(a)
    total = 0.0
    for va in set(a):
        for vb in set(b):
            joint = sum(1 for x, y in zip(a, b, strict=True) if x == va and y == vb) / n
            if joint:
                total += joint * math.log(joint / ((a.count(va) / n) * (b.count(vb) / n)))
    return total


def test_mutual_information_matches_the_definition_on_a_tiny_example():
    binned = np.array([[0, 0], [0, 1], [1, 0], [1, 1], [2, 1], [2, 1]])
    factors = np.array([[0, 1], [0, 0], [1, 1], [1, 0], [1, 0], [0, 0]])
    got = mutual_information_matrix(binned, factors)
    for j in range(2):
        for k in range(2):
            expected = hand_mi(binned[:, j].tolist(), factors[:, k].tolist())
            assert got[j, k] == pytest.approx(expected, abs=1e-12)
    # A copy of a uniform binary factor carries log 2 of it; an independent one none.
    copy = mutual_information_matrix(np.array([[0], [0], [1], [1]]), np.array([[0], [0], [1], [1]]))
    independent = mutual_information_matrix(
        np.array([[0], [1], [0], [1]]), np.array([[0], [0], [1], [1]])
    )
    assert copy[0, 0] == pytest.approx(math.log(2))
    assert independent[0, 0] == pytest.approx(0.0, abs=1e-12)
    assert factor_entropies(np.array([[0], [0], [1], [2]]))[0] == pytest.approx(
        -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    )


def test_discretize_cuts_each_latent_into_equal_width_bins_as_numpy_histogram_counts():
    codes = np.random.default_rng(0).standard_normal((500, 3)) * [1.0, 5.0, 0.1]
    binned = discretize(codes, bins=7)
    assert binned.min() == 0 and binned.max() == 6
    for j in range(3):
        counts, _ = np.histogram(codes[:, j], bins=7)
        assert np.array_equal(np.bincount(binned[:, j], minlength=7), counts)
    assert (discretize(np.ones((4, 1)), bins=5) == discretize(np.ones((4, 1)), 5)[0]).all()


def test_mig_on_a_tiny_example_is_the_gap_over_the_entropy_by_hand():
    # Latent 0 copies the binary factor; latent 1 agrees with it on 3 of 4 images.
    factors = np.array([[0], [0], [1], [1]])
    codes = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    result = mig(codes, factors, bins=2)
    second = hand_mi([0, 1, 1, 1], [0, 0, 1, 1])
    assert result["mig"] == pytest.approx((math.log(2) - second) / math.log(2))
    assert result["normalized_mi"][0][0] == pytest.approx(1.0)
    assert result["settings"]["bins"] == 2


# --------------------------------------------------------------------------------------------
# The three metrics on codes whose answer is known


def test_codes_that_are_the_factors_score_near_one():
    factors = grid_factors(600)
    codes = noisy_codes(factors)
    scores = disentanglement_scores(codes, factors, ["shape", "scale", "posx"])
    assert scores["mig"] > 0.9
    assert scores["dci_disentanglement"] > 0.9
    assert scores["dci_completeness"] > 0.9
    assert scores["dci_informativeness"] > 0.95
    assert scores["latent_factor"]["best_factor"] == ["shape (1.00)", "scale (1.00)", "posx (1.00)"]


def test_random_codes_score_near_zero():
    factors = grid_factors(600)
    codes = np.random.default_rng(5).standard_normal((600, 4))
    scores = disentanglement_scores(codes, factors)
    assert scores["mig"] < 0.05
    assert scores["dci_disentanglement"] < 0.1
    assert scores["sap"] < 0.05
    assert scores["dci_informativeness"] < 0.6  # near chance: 1/2, 1/3, 1/4


def test_a_rotation_of_the_factors_drops_mig_but_keeps_informativeness():
    factors = grid_factors(1000)
    codes = noisy_codes(factors, noise=0.01)
    rotated = (codes - 0.5) @ rotation(codes.shape[1])
    aligned = disentanglement_scores(codes, factors)
    mixed = disentanglement_scores(rotated, factors)
    assert mixed["mig"] < 0.5 * aligned["mig"]
    assert mixed["dci_disentanglement"] < aligned["dci_disentanglement"] - 0.2
    assert mixed["dci_informativeness"] > 0.85  # the information is all there, mixed


def test_dci_from_an_importance_matrix_by_hand():
    assert dci_from_importance(np.eye(3)) == pytest.approx((1.0, 1.0), abs=1e-8)
    assert dci_from_importance(np.ones((3, 3))) == pytest.approx((0.0, 0.0), abs=1e-8)
    # Latent 0 informs both factors equally, latent 1 only factor 1.
    r = np.array([[0.5, 0.5], [0.0, 1.0]])
    entropy_1 = 1.0  # latent 0: (1/2, 1/2) in base 2
    d_expected = (1 - entropy_1) * 1.0 / 2.0 + 1.0 * 1.0 / 2.0
    column = np.array([1 / 3, 2 / 3])  # factor 1: importance 0.5 and 1.0, normalised
    h_column = -np.sum(column * np.log2(column))
    c_expected = 1.0 * 0.5 / 2.0 + (1 - h_column) * 1.5 / 2.0
    d, c = dci_from_importance(r)
    assert d == pytest.approx(d_expected, abs=1e-6)
    assert c == pytest.approx(c_expected, abs=1e-6)


def test_dci_states_its_settings_and_predicts_held_out_codes():
    factors = grid_factors(300)
    result = dci(noisy_codes(factors), factors, seed=3)
    assert result["settings"]["regressor"] == "random_forest"
    assert result["settings"]["num_train"] + result["settings"]["num_test"] == 300
    assert result["settings"]["num_test"] == 60 and result["settings"]["seed"] == 3
    importance = np.array(result["importance"])
    assert importance.shape == (3, 3)
    assert np.allclose(importance.sum(0), 1.0)  # a tree ensemble's importances sum to 1
    assert np.argmax(importance, axis=0).tolist() == [0, 1, 2]


def test_sap_of_binary_factors_is_the_gap_over_a_coin_flip():
    # A binary factor is predicted perfectly from its own latent and at chance (1/2, balanced)
    # from the other: SAP is about 1 - 1/2.
    factors = grid_factors(800, sizes=(2, 2))
    result = sap(noisy_codes(factors), factors)
    scores = np.array(result["score_matrix"])
    assert np.diag(scores) == pytest.approx([1.0, 1.0], abs=0.01)
    assert scores[0, 1] == pytest.approx(0.5, abs=0.1) and scores[1, 0] == pytest.approx(
        0.5, abs=0.1
    )
    # The gap by hand, from the score matrix.
    expected = np.mean([scores[0, 0] - scores[1, 0], scores[1, 1] - scores[0, 1]])
    assert result["sap"] == pytest.approx(expected)
    assert result["settings"]["classifier_settings"] == {"C": 0.01, "class_weight": "balanced"}
    random = sap(np.random.default_rng(5).standard_normal((800, 2)), factors)
    assert random["sap"] < 0.05


# --------------------------------------------------------------------------------------------
# What a report needs


def test_constant_factors_are_left_out_and_named():
    factors = grid_factors(300)
    with_colour = np.concatenate([np.zeros((300, 1), dtype=np.int64), factors], axis=1)
    scores = disentanglement_scores(
        torch.from_numpy(noisy_codes(factors)).float(),
        torch.from_numpy(with_colour),
        ["color", "shape", "scale", "posx"],
    )
    assert scores["constant_factors"] == ["color"]
    assert scores["factor_names"] == ["shape", "scale", "posx"]
    assert set(scores["per_factor"]) == {"shape", "scale", "posx"}
    assert set(SCORE_KEYS) <= set(scores)
    assert all(0.0 <= scores[key] <= 1.0 for key in SCORE_KEYS)
    assert set(scores["settings"]) == {"mig", "dci", "sap"}
    assert scores["settings"]["mig"]["bins"] == 20


def test_latent_factor_scores_and_best_factors():
    factors = grid_factors(400)
    codes = noisy_codes(factors)[:, [2, 0, 1]]  # latent 0 carries factor 2, ...
    scores, used = latent_factor_scores(codes, factors)
    assert used == [0, 1, 2]
    assert np.argmax(scores, axis=1).tolist() == [2, 0, 1]
    assert best_factors(scores, ["a", "b", "c"])[0].startswith("c (")


@pytest.mark.parametrize(
    ("codes", "factors", "message"),
    [
        (np.zeros((5, 2)), np.zeros((4, 1), dtype=np.int64), "N=5"),
        (np.zeros((5, 1)), np.arange(5)[:, None], "at least 2 latents"),
        (np.zeros((5, 2)), np.zeros((5, 1)), "integer"),
        (np.zeros((5, 2)), np.zeros((5, 1), dtype=np.int64), "single value"),
        (np.full((5, 2), np.nan), np.arange(5)[:, None], "finite"),
    ],
)
def test_bad_input_says_what_is_wrong(codes, factors, message):
    with pytest.raises(ValueError, match=message):
        mig(codes, factors)


# --------------------------------------------------------------------------------------------
# scripts/evaluate.py on data with factors (data=shapes; here digits given two factors)


def compose_evaluate(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from vae_experiments.configs import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("evaluate", overrides=overrides)


@pytest.fixture
def digits_with_factors(monkeypatch):
    """Every run's digits labelled as data with known factors are (the contract data=shapes
    keeps): labels (N, 2), the digit and its ink in quartiles, with ImageData.factor_names; the
    sample-quality classifier refuses factor labels as unlabelled data (as data=shapes makes
    load_or_train_classifier do)."""
    import vae_experiments.analysis.classifier as classifier
    import vae_experiments.runs as runs
    from vae_experiments.data.images import ImageData

    def no_classes(train_images, train_labels, *args, **kwargs):
        raise classifier.UnlabelledDataError(f"the labels are {train_labels.shape[1]} factors")

    monkeypatch.setattr(classifier, "load_or_train_classifier", no_classes)

    load_data = runs.load_data
    # Factors only once the digits are loaded as classes (ImageData checks labels at setup).
    for name in ("factor_names", "factor_sizes"):
        fake = property(lambda self, name=name: self.__dict__.get(f"fake_{name}"))
        monkeypatch.setattr(ImageData, name, fake, raising=False)

    def load(cfg, **overrides):
        data = load_data(cfg, **overrides)
        for dataset in data.splits.values():
            ink = dataset.images.float().mean((1, 2, 3))
            quartile = torch.bucketize(ink, torch.quantile(ink, torch.tensor([0.25, 0.5, 0.75])))
            dataset.labels = torch.stack([dataset.labels, quartile], dim=1)  # (N, 2)
        data.fake_factor_names, data.fake_factor_sizes = ("digit", "ink"), (10, 4)
        return data

    monkeypatch.setattr(runs, "load_data", load)


def test_evaluate_scores_the_codes_of_data_with_factors(
    trained_runs, tmp_path, capsys, caplog, digits_with_factors
):
    import shutil

    from vae_experiments.cli.evaluate import evaluate
    from vae_experiments.runs import read_metrics

    run = shutil.copytree(trained_runs("vae"), tmp_path / "run")
    with caplog.at_level("WARNING"):
        record = evaluate(compose_evaluate([f"run={run}", "k=2", "device=cpu", "seed=3"]))
    out = capsys.readouterr().out
    scores = record["disentanglement"]
    metrics = read_metrics(run)
    for key in SCORE_KEYS:
        assert metrics[f"test/disentanglement.{key}"] == scores[key]
        assert 0.0 <= scores[key] <= 1.0
    test_images = metrics["test/log_px_images"]
    assert metrics["test/disentanglement.images"] == scores["images"] == test_images
    assert scores["factor_names"] == ["digit", "ink"]
    assert len(scores["latent_factor"]["best_factor"]) == 4  # one per latent
    assert scores["settings"]["mig"]["bins"] == 20
    assert scores["settings"]["dci"]["regressor"] == "random_forest"
    assert scores["settings"]["dci"]["seed"] == 3
    # The labels are factors: no classifier to measure samples with, said once, not an error.
    assert record["sample_quality"] is None and "test/fd_classifier" not in metrics
    assert "no sample quality: the labels are 2 factors" in caplog.text
    assert f"Disentanglement: the codes (posterior means) of {test_images} test images" in out
    assert "MIG" in out and "20 equal-width bins per latent" in out and "z0: " in out
    saved = json.loads(
        (run / "analysis" / "evaluate-best-test-k2" / "evaluate_test.json").read_text()
    )
    assert saved["disentanglement"]["mig"] == scores["mig"]


def test_evaluate_scores_an_autoencoders_codes_and_checks_its_settings(
    trained_runs, tmp_path, capsys, digits_with_factors
):
    import shutil

    from vae_experiments.cli.evaluate import UsageError, evaluate
    from vae_experiments.runs import read_metrics

    run = shutil.copytree(trained_runs("ae"), tmp_path / "run")
    overrides = [f"run={run}", "device=cpu", "disentanglement.images=100"]
    record = evaluate(compose_evaluate([*overrides, "disentanglement.bins=10"]))
    assert record["metrics"] == {} and record["disentanglement"]["images"] == 100
    assert record["disentanglement"]["settings"]["mig"]["bins"] == 10
    assert read_metrics(run)["test/disentanglement.images"] == 100
    for setting, message in [
        ("disentanglement.bins=1", "disentanglement.bins must be an integer >= 2, got .*=1"),
        ("disentanglement.regressor=lasso", "must be one of random_forest, gradient_boosting"),
        ("disentanglement.test_fraction=1.5", "between 0 and 1 .*test_fraction=1.5"),
        ("disentanglement.images=5", "need at least 10 images"),
    ]:
        with pytest.raises(UsageError, match=message):
            evaluate(compose_evaluate([*overrides, setting]))
    # Nothing left to measure of an AE: no likelihood, no sample quality, no disentanglement.
    with pytest.raises(UsageError, match="needs a VAE.*quality.samples=0 leaves nothing"):
        evaluate(compose_evaluate([*overrides, "disentanglement.images=0", "quality.samples=0"]))


def test_evaluate_on_data_without_factors_writes_no_disentanglement(trained_runs, tmp_path):
    import shutil

    from vae_experiments.cli.evaluate import evaluate
    from vae_experiments.runs import read_metrics

    run = shutil.copytree(trained_runs("vae"), tmp_path / "run")
    record = evaluate(compose_evaluate([f"run={run}", "k=2", "device=cpu", "quality.samples=0"]))
    assert record["disentanglement"] is None
    assert not any(key.startswith("test/disentanglement.") for key in read_metrics(run))


# --------------------------------------------------------------------------------------------
# scripts/summarize.py: the report over seeds, and traversals that name each latent's factor


def scored_metrics(score: float, recon: float) -> dict:
    metrics = {f"test/disentanglement.{key}": score for key in SCORE_KEYS}
    return {**metrics, "test/recon": recon, "test/kl": 1.0, "test/loss": recon + 1.0}


def test_the_report_shows_each_configurations_mean_and_spread_over_its_seeds(tmp_path, capsys):
    import csv
    import statistics

    from tests.test_sweeps import make_run
    from vae_experiments.cli.summarize import main

    scores = {("vae", 0): 0.1, ("vae", 1): 0.2, ("vae", 2): 0.3, ("btcvae", 0): 0.5}
    scores[("btcvae", 1)] = 0.7
    for (model, seed), score in scores.items():
        make_run(
            tmp_path / "sweep" / f"{model}_{seed}",
            [f"model={model}", f"seed={seed}"],
            scored_metrics(score, recon=10.0 + seed),
        )
    failed = {"status": "failed", "error": "boom"}
    make_run(tmp_path / "sweep" / "vae_3", ["model=vae", "seed=3"], status=failed)
    make_run(tmp_path / "sweep" / "ae_0", ["model=ae", "seed=0"], scored_metrics(0.9, 5.0))

    # Automatic: the runs have the scores.
    assert main([str(tmp_path / "sweep"), "--no-plot"]) == 0
    out = capsys.readouterr().out
    report = (tmp_path / "sweep" / "disentanglement.md").read_text()
    assert report in out
    assert "6 scored runs in 3 configurations" in report and "Locatello et al. 2019" in report
    header = (
        "| model | runs | seeds | mig | dci_disentanglement | dci_completeness | "
        "dci_informativeness | sap | test/recon | test/kl |"
    )
    assert header in report
    assert "| btcvae | 2 | 0,1 | 0.6000 ± 0.14 | 0.6000 ± 0.14 |" in report
    assert "| vae | 3 | 0,1,2 | 0.2000 ± 0.10 | 0.2000 ± 0.10 |" in report
    assert (
        report.count("| 11.00 ± 1.0 | 1.000 ± 0 |") == 1
    )  # vae: recon 10, 11, 12; the failed run left out
    assert "| ae | 1 | 0 | 0.9000 | 0.9000 |" in report
    assert "WARNING: 1 configuration with a single seed, no spread" in report
    assert "No evaluation record found" in report  # these runs were never evaluated

    rows = list(csv.DictReader((tmp_path / "sweep" / "disentanglement.csv").open()))
    vae = next(row for row in rows if row["model"] == "vae")
    mig = "test/disentanglement.mig"
    assert float(vae[f"{mig}:mean"]) == pytest.approx(0.2)
    assert float(vae[f"{mig}:std"]) == pytest.approx(statistics.stdev([0.1, 0.2, 0.3]))
    assert (float(vae[f"{mig}:min"]), float(vae[f"{mig}:max"])) == (0.1, 0.3)
    assert vae[f"{mig}:n"] == "3" and vae["seeds"] == "0 1 2"

    # Asked for: the table's columns are the scores, the best MIG first.
    assert main([str(tmp_path / "sweep"), "--no-plot", "--disentanglement"]) == 0
    out = capsys.readouterr().out
    assert "sorted by test/disentanglement.mig, descending" in out
    # Nothing scored yet: what to run.
    make_run(tmp_path / "plain" / "vae", ["model=vae"], {"test/loss": 1.0})
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "plain"), "--disentanglement"])
    assert exit_info.value.code == 2
    assert "no run has test/disentanglement.mig: score each run first with" in (
        capsys.readouterr().err
    )


def test_seed_keys():
    from vae_experiments.analysis.sweeps import is_seed_key

    assert is_seed_key("seed") and is_seed_key("data.seed")
    assert not is_seed_key("data.split_seed") and not is_seed_key("model.beta")


def test_row_labels_name_each_latents_factor():
    from vae_experiments.analysis.disentanglement import factor_row_labels

    labels = factor_row_labels(["z0: -1.6 to 1.7", "z1: -2 to 0.5"], ["posx (0.62)", "shape (0.1)"])
    assert labels == ["z0: posx (0.62), -1.6 to 1.7", "z1: shape (0.1), -2 to 0.5"]
    with pytest.raises(ValueError, match="2 traversal rows for 1 latents"):
        factor_row_labels(["z0: 0 to 1", "z1: 0 to 1"], ["posx (0.62)"])


def test_summarize_draws_a_traversal_per_run_with_each_rows_factor(
    trained_runs, tmp_path, capsys, monkeypatch, digits_with_factors
):
    import shutil

    import yaml

    import vae_experiments.pictures as pictures
    from vae_experiments.cli.evaluate import evaluate
    from vae_experiments.cli.summarize import main

    sweep = tmp_path / "sweep"
    records = {}
    for seed in (0, 1):
        run = shutil.copytree(trained_runs("vae"), sweep / str(seed))
        (run / ".hydra").mkdir(exist_ok=True)
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={seed}"]))
        overrides = ["k=2", "device=cpu", "quality.samples=0", "disentanglement.images=200"]
        records[seed] = evaluate(compose_evaluate([f"run={run}", *overrides]))
    capsys.readouterr()
    grids = []
    image_grid = pictures.image_grid

    def recording_grid(rows, min_side=48, row_labels=None):
        grids.append(row_labels)
        return image_grid(rows, min_side, row_labels)

    monkeypatch.setattr(pictures, "image_grid", recording_grid)
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert (sweep / "traversal_0.png").is_file() and (sweep / "traversal_1.png").is_file()
    assert "- `0`: traversal_0.png" in out
    assert "Scored by scripts/evaluate.py on 200 test codes; MIG with 20 equal-width bins" in out
    assert len(grids) == 2
    best = records[0]["disentanglement"]["latent_factor"]["best_factor"]
    assert len(grids[0]) == len(best) == 4  # a row per latent
    for j, (label, factor) in enumerate(zip(grids[0], best, strict=True)):
        assert label.startswith(f"z{j}: {factor}, ") and " to " in label
    assert factor.split(" (")[0] in ("digit", "ink")


@pytest.mark.slow  # a subprocess for one message (evaluate() refuses it in the tests above)
def test_a_bad_setting_is_one_error_line_before_anything_is_written(trained_runs, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    run = shutil.copytree(trained_runs("vae"), tmp_path / "run")
    before = (run / "metrics.json").read_bytes()
    analyses = sorted((run / "analysis").glob("*"))
    command = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "evaluate.py"),
        f"run={run}",
        "disentanglement.regressor=lasso",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: disentanglement.regressor must be one of random_forest, gradient_boosting, got "
        "disentanglement.regressor=lasso"
    )
    assert "Traceback" not in done.stderr
    assert sorted((run / "analysis").glob("*")) == analyses  # no call folder left behind
    assert (run / "metrics.json").read_bytes() == before
