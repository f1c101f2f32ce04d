"""Disentanglement metrics: how well each latent of a model's codes captures one known factor of
the data (data with factor labels, e.g. ``data=shapes``).

Every function takes codes (N, D) (a VAE's posterior means, one row per image) and factors
(N, F) (int64, the index of each factor's value for the same images) and returns a dict of plain
Python numbers and lists (JSON-ready) with a ``settings`` entry that states its estimator:

- :func:`mig`: the Mutual Information Gap (Chen et al. 2018, "Isolating Sources of
  Disentanglement in Variational Autoencoders", https://arxiv.org/abs/1802.04942), on codes
  discretised into equal-width bins as disentanglement_lib does.
- :func:`dci`: disentanglement, completeness and informativeness (Eastwood & Williams 2018, "A
  Framework for the Quantitative Evaluation of Disentangled Representations",
  https://openreview.net/forum?id=By-7dz-AZ) from the feature importances of a tree ensemble per
  factor.
- :func:`sap`: the Separated Attribute Predictability score (Kumar et al. 2018, "Variational
  Inference of Disentangled Latent Concepts from Unlabeled Observations",
  https://arxiv.org/abs/1711.00848), from one-latent linear classifiers.
- :func:`latent_factor_scores`: the (D, F) normalised mutual information MI(z_j; v_k) / H(v_k)
  behind MIG, which says what each latent captures (:func:`best_factors`).

:func:`disentanglement_scores` computes all of them at once. Factors that take a single value
among the N images carry no information (dSprites' colour) and are left out of every metric; the
settings list them. All scores are in [0, 1], higher is more disentangled (informativeness: a
mean test accuracy). Locatello et al. 2019 ("Challenging Common Assumptions in the Unsupervised
Learning of Disentangled Representations", https://arxiv.org/abs/1811.12359) found these scores
vary more between random seeds than between methods: compare models by their spread over seeds.

Plain numpy and scikit-learn (already a dependency)::

    codes = encode_split(model, iterate_split(data, "test"))   # (N, D)
    scores = disentanglement_scores(codes, labels, data.factor_names)
    print(scores["mig"], scores["dci_disentanglement"], scores["settings"])
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

#: Equal-width bins per latent for the mutual information (disentanglement_lib's default).
DEFAULT_BINS = 20
#: Share of the images held out to test the DCI and SAP predictors.
DEFAULT_TEST_FRACTION = 0.2
#: The DCI regressors: a random forest (the default: about 10x faster than gradient boosting on
#: one CPU core at the same test accuracy, 6 s against 60 s for 4000 codes of 10 latents and 5
#: factors of 3 to 8 values) or disentanglement_lib's gradient-boosted trees (scikit-learn's
#: defaults).
DCI_REGRESSORS = ("random_forest", "gradient_boosting")
#: The random forest's settings: every latent considered at every split (with scikit-learn's
#: default of sqrt(D) candidates, a split must often use a latent that carries nothing of the
#: factor, and codes equal to the factors score DCI disentanglement 0.6 instead of 1), and
#: depth-limited (fully grown trees give noise latents importance).
FOREST_SETTINGS = {"n_estimators": 50, "max_depth": 8, "max_features": None}
#: SAP's classifier per (latent, factor), as disentanglement_lib's sap_score for discrete factors.
SAP_SETTINGS = {"C": 0.01, "class_weight": "balanced"}


# --------------------------------------------------------------------------------------------
# Inputs


def _as_arrays(codes: Any, factors: Any) -> tuple[np.ndarray, np.ndarray]:
    """Codes (N, D) as float64 and factors (N, F) as int64 numpy arrays, checked."""
    # torch tensors without importing torch: sweep reports import this module for its names.
    if hasattr(codes, "detach"):
        codes = codes.detach().cpu().double().numpy()
    if hasattr(factors, "detach"):
        factors = factors.detach().cpu().numpy()
    codes = np.asarray(codes, dtype=np.float64)
    factors = np.asarray(factors)
    if codes.ndim != 2 or codes.shape[0] < 2:
        raise ValueError(f"codes must have shape (N, latent_dim), N >= 2; got {codes.shape}")
    if factors.ndim != 2 or factors.shape[0] != codes.shape[0]:
        raise ValueError(
            f"factors must have shape (N, num_factors) with the codes' N={codes.shape[0]}; got "
            f"{factors.shape}"
        )
    if not np.issubdtype(factors.dtype, np.integer):
        raise ValueError(f"factors must be integer value indices, got dtype {factors.dtype}")
    if not np.isfinite(codes).all():
        raise ValueError("codes must be finite (a NaN or inf code has no bin or split)")
    return codes, factors.astype(np.int64)


def varying_factors(factors: np.ndarray) -> list[int]:
    """The columns of factors (N, F) that take more than one value (the ones a metric can
    score)."""
    return [k for k in range(factors.shape[1]) if np.unique(factors[:, k]).size > 1]


def _factor_names(names: Sequence[str] | None, count: int) -> list[str]:
    if names is None:
        return [f"factor{k}" for k in range(count)]
    if len(names) != count:
        raise ValueError(f"{len(names)} factor names for {count} factors")
    return [str(n) for n in names]


def train_test_split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a seeded random split of n items: (train, test), test ``test_fraction`` of
    them (at least one each)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    num_test = min(n - 1, max(1, round(n * test_fraction)))
    return order[num_test:], order[:num_test]


# --------------------------------------------------------------------------------------------
# Mutual information (MIG and the latent-factor scores)


def discretize(codes: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Codes (N, D) as bin indices (N, D) in [0, bins): each latent's range [min, max] over the
    N codes cut into ``bins`` equal-width bins (disentanglement_lib's ``_histogram_discretize``);
    a constant latent falls into one bin."""
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    binned = np.empty(codes.shape, dtype=np.int64)
    for j in range(codes.shape[1]):
        edges = np.histogram_bin_edges(codes[:, j], bins=bins)
        # Inner edges only: the maximum lands in the last bin, as numpy's histogram counts it.
        binned[:, j] = np.digitize(codes[:, j], edges[1:-1])
    return binned


def _mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """MI in nats of two discrete variables given as (N,) integer samples (plug-in estimate)."""
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1.0)
    joint /= joint.sum()
    outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
    nonzero = joint > 0
    return float(np.sum(joint[nonzero] * np.log(joint[nonzero] / outer[nonzero])))


def mutual_information_matrix(binned: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """MI(z_j; v_k) in nats (D, F) between discretised codes (N, D) and factors (N, F)."""
    return np.array(
        [
            [_mutual_information(binned[:, j], factors[:, k]) for k in range(factors.shape[1])]
            for j in range(binned.shape[1])
        ]
    )


def factor_entropies(factors: np.ndarray) -> np.ndarray:
    """H(v_k) in nats (F,) of factors (N, F), from their empirical frequencies."""
    entropies = []
    for k in range(factors.shape[1]):
        p = np.unique(factors[:, k], return_counts=True)[1] / factors.shape[0]
        entropies.append(float(-np.sum(p * np.log(p))))
    return np.array(entropies)


def latent_factor_scores(
    codes: Any, factors: Any, bins: int = DEFAULT_BINS
) -> tuple[np.ndarray, list[int]]:
    """Normalised mutual information MI(z_j; v_k) / H(v_k) (D, F'), in [0, 1]: the share of
    each factor's entropy that one latent carries (codes (N, D) discretised as :func:`discretize`).

    Returns:
        The matrix over the varying factors only, and their column indices in ``factors``
        (:func:`varying_factors`).
    """
    codes, factors = _as_arrays(codes, factors)
    used = varying_factors(factors)
    if not used:
        raise ValueError("every factor takes a single value among these images: nothing to score")
    factors = factors[:, used]
    mi = mutual_information_matrix(discretize(codes, bins), factors)
    return mi / factor_entropies(factors)[None, :], used


def best_factors(
    scores: np.ndarray | Sequence[Sequence[float]], factor_names: Sequence[str]
) -> list[str]:
    """Per latent (row of a (D, F) score matrix), the name of the factor it scores highest on,
    with the score: ``"posx (0.62)"``."""
    scores = np.asarray(scores, dtype=np.float64)
    return [f"{factor_names[int(np.argmax(row))]} ({float(np.max(row)):.2f})" for row in scores]


def factor_row_labels(range_labels: Sequence[str], best: Sequence[str]) -> list[str]:
    """Row labels of a latent traversal that say what each latent captures: a traversal's
    ``"z3: -1.6 to 1.7"`` (:func:`~vae_experiments.analysis.latent.traversal_labels`) and the
    latent's :func:`best_factors` entry ``"posx (0.62)"`` -> ``"z3: posx (0.62), -1.6 to 1.7"``.
    """
    if len(range_labels) != len(best):
        raise ValueError(f"{len(range_labels)} traversal rows for {len(best)} latents' factors")
    labels = []
    for row, factor in zip(range_labels, best, strict=True):
        name, _, sweep = row.partition(": ")
        labels.append(f"{name}: {factor}, {sweep}")
    return labels


def mig(codes: Any, factors: Any, bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """Mutual Information Gap (Chen et al. 2018): per factor v_k, the gap between the two latents
    with the highest MI(z_j; v_k), divided by H(v_k); averaged over the factors.

    Codes (N, D) are discretised into ``bins`` equal-width bins per latent (:func:`discretize`),
    and MI and H are plug-in estimates from the N samples (as disentanglement_lib's
    ``compute_mig``). 1: each factor is in one latent alone; 0: no latent carries more of a
    factor than the next one.

    Args:
        codes: (N, D) with D >= 2, e.g. posterior means.
        factors: (N, F) int64 value indices.
        bins: bins per latent.

    Returns:
        ``mig`` (the mean), ``mig_per_factor`` (F',) over the varying factors, ``factors_used``
        (their indices), ``normalized_mi`` (D, F') and ``settings``.
    """
    codes, factors = _as_arrays(codes, factors)
    if codes.shape[1] < 2:
        raise ValueError(f"MIG needs at least 2 latents (a gap between two), got {codes.shape[1]}")
    scores, used = latent_factor_scores(codes, factors, bins)
    top_two = -np.sort(-scores, axis=0)[:2]  # (2, F'): the largest two per factor
    gaps = top_two[0] - top_two[1]
    return {
        "mig": float(gaps.mean()),
        "mig_per_factor": gaps.tolist(),
        "factors_used": used,
        "normalized_mi": scores.tolist(),
        "settings": {"bins": bins, "discretization": "equal-width per latent, min to max"},
    }


# --------------------------------------------------------------------------------------------
# DCI


def _make_regressor(regressor: str, seed: int) -> Any:
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier

    if regressor == "random_forest":
        return RandomForestClassifier(**FOREST_SETTINGS, random_state=seed, n_jobs=1)
    if regressor == "gradient_boosting":
        return GradientBoostingClassifier(random_state=seed)
    raise ValueError(f"regressor must be one of {', '.join(DCI_REGRESSORS)}, got {regressor!r}")


def _entropy_rows(p: np.ndarray, base: int) -> np.ndarray:
    """Entropy (rows,) of each row of non-negative weights (rows, K), normalised per row, in
    log base ``base`` (scipy.stats.entropy's, as disentanglement_lib computes it)."""
    p = p + 1e-11  # an all-zero row is uniform, as in disentanglement_lib
    p = p / p.sum(1, keepdims=True)
    return -np.sum(p * np.log(p), axis=1) / np.log(base)


def dci_from_importance(importance: np.ndarray) -> tuple[float, float]:
    """Disentanglement and completeness of an importance matrix R (D, F) (Eastwood & Williams).

    Disentanglement: per latent j, 1 - H_F(R_j. / sum_k R_jk), weighted by the latent's share of
    the total importance. Completeness: per factor k, 1 - H_D(R_.k / sum_j R_jk), weighted by
    the factor's share. H_F and H_D are entropies in log base F and D.
    """
    num_codes, num_factors = importance.shape
    total = importance.sum()
    weights = importance if total > 0 else np.ones_like(importance)
    disentanglement = completeness = float("nan")
    if num_factors > 1:
        per_code = 1 - _entropy_rows(importance, num_factors)
        disentanglement = float(np.sum(per_code * weights.sum(1) / weights.sum()))
    if num_codes > 1:
        per_factor = 1 - _entropy_rows(importance.T, num_codes)
        completeness = float(np.sum(per_factor * weights.sum(0) / weights.sum()))
    return disentanglement, completeness


def dci(
    codes: Any,
    factors: Any,
    regressor: str = "random_forest",
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
) -> dict[str, Any]:
    """DCI (Eastwood & Williams 2018): a classifier per factor predicts the factor's value from
    the codes; its feature importances (impurity-based, summing to 1 per factor) form the
    importance matrix R (D, F'), from which :func:`dci_from_importance` gives disentanglement
    and completeness; informativeness is the predictors' mean accuracy on held-out codes.

    Args:
        codes: (N, D) codes.
        factors: (N, F) int64 value indices.
        regressor: ``random_forest`` (:data:`FOREST_SETTINGS`) or ``gradient_boosting``
            (disentanglement_lib's: scikit-learn's GradientBoostingClassifier defaults, 100
            depth-3 trees per class; slow for factors with many values).
        test_fraction: share of the N codes held out (a seeded random split); the rest train.
        seed: the split's and the regressor's seed.

    Returns:
        ``dci_disentanglement``, ``dci_completeness``, ``dci_informativeness`` (mean test
        accuracy), ``dci_informativeness_train``, ``test_accuracy_per_factor`` (F'),
        ``importance`` (D, F'), ``factors_used`` and ``settings``.
    """
    codes, factors = _as_arrays(codes, factors)
    used = varying_factors(factors)
    if not used:
        raise ValueError("every factor takes a single value among these images: nothing to score")
    train, test = train_test_split(codes.shape[0], test_fraction, seed)
    importance = np.zeros((codes.shape[1], len(used)))
    train_accuracy, test_accuracy = [], []
    for column, k in enumerate(used):
        model = _make_regressor(regressor, seed)
        model.fit(codes[train], factors[train, k])
        importance[:, column] = np.abs(model.feature_importances_)
        train_accuracy.append(float(np.mean(model.predict(codes[train]) == factors[train, k])))
        test_accuracy.append(float(np.mean(model.predict(codes[test]) == factors[test, k])))
    disentanglement, completeness = dci_from_importance(importance)
    regressor_settings = (
        dict(FOREST_SETTINGS) if regressor == "random_forest" else {"n_estimators": 100}
    )
    return {
        "dci_disentanglement": disentanglement,
        "dci_completeness": completeness,
        "dci_informativeness": float(np.mean(test_accuracy)),
        "dci_informativeness_train": float(np.mean(train_accuracy)),
        "test_accuracy_per_factor": test_accuracy,
        "importance": importance.tolist(),
        "factors_used": used,
        "settings": {
            "regressor": regressor,
            "regressor_settings": regressor_settings,
            "num_train": int(train.size),
            "num_test": int(test.size),
            "seed": seed,
        },
    }


# --------------------------------------------------------------------------------------------
# SAP


def sap_score_matrix(
    codes: np.ndarray, factors: np.ndarray, train: np.ndarray, test: np.ndarray
) -> np.ndarray:
    """Test accuracy (D, F) of a linear classifier from one latent z_j to one factor v_k
    (scikit-learn's LinearSVC with :data:`SAP_SETTINGS`, one-vs-rest: thresholds on z_j), as
    disentanglement_lib's ``sap_score`` for discrete factors."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    scores = np.zeros((codes.shape[1], factors.shape[1]))
    with warnings.catch_warnings():
        # A latent that carries nothing of a factor does not converge; its score is still its
        # accuracy (near chance), which is what SAP compares.
        warnings.simplefilter("ignore", ConvergenceWarning)
        for j in range(codes.shape[1]):
            x_train, x_test = codes[train, j : j + 1], codes[test, j : j + 1]
            for k in range(factors.shape[1]):
                if np.unique(factors[train, k]).size < 2:
                    continue  # nothing to fit: this split's training part has one value
                classifier = LinearSVC(**SAP_SETTINGS)
                classifier.fit(x_train, factors[train, k])
                scores[j, k] = float(np.mean(classifier.predict(x_test) == factors[test, k]))
    return scores


def sap(
    codes: Any,
    factors: Any,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
) -> dict[str, Any]:
    """SAP (Kumar et al. 2018): per factor, the gap between the two highest one-latent
    prediction scores (:func:`sap_score_matrix`: test accuracy of a linear classifier from that
    latent alone, for discrete factors as in the paper); averaged over the factors.

    Args:
        codes: (N, D) codes, D >= 2.
        factors: (N, F) int64 value indices.
        test_fraction: share of the N codes held out (a seeded random split, as :func:`dci`'s).
        seed: the split's seed.

    Returns:
        ``sap``, ``sap_per_factor`` (F'), ``score_matrix`` (D, F'), ``factors_used`` and
        ``settings``.
    """
    codes, factors = _as_arrays(codes, factors)
    if codes.shape[1] < 2:
        raise ValueError(f"SAP needs at least 2 latents (a gap between two), got {codes.shape[1]}")
    used = varying_factors(factors)
    if not used:
        raise ValueError("every factor takes a single value among these images: nothing to score")
    train, test = train_test_split(codes.shape[0], test_fraction, seed)
    scores = sap_score_matrix(codes, factors[:, used], train, test)
    top_two = -np.sort(-scores, axis=0)[:2]
    gaps = top_two[0] - top_two[1]
    return {
        "sap": float(gaps.mean()),
        "sap_per_factor": gaps.tolist(),
        "score_matrix": scores.tolist(),
        "factors_used": used,
        "settings": {
            "classifier": "LinearSVC on one latent",
            "classifier_settings": dict(SAP_SETTINGS),
            "num_train": int(train.size),
            "num_test": int(test.size),
            "seed": seed,
        },
    }


# --------------------------------------------------------------------------------------------
# All at once


#: The scalar scores of :func:`disentanglement_scores`, in the order reports show them.
SCORE_KEYS = ("mig", "dci_disentanglement", "dci_completeness", "dci_informativeness", "sap")
#: What ``scripts/evaluate.py`` writes them under in metrics.json, after ``{split}/``:
#: ``test/disentanglement.mig``, ... and ``test/disentanglement.images`` (the codes scored).
METRIC_PREFIX = "disentanglement."


def disentanglement_scores(
    codes: Any,
    factors: Any,
    factor_names: Sequence[str] | None = None,
    bins: int = DEFAULT_BINS,
    regressor: str = "random_forest",
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
) -> dict[str, Any]:
    """MIG, DCI and SAP of codes (N, D) against factors (N, F), with everything a report needs.

    Returns:
        The :data:`SCORE_KEYS` (floats), ``num_codes`` (N), ``latent_dim`` (D),
        ``factor_names`` (the varying factors'), ``constant_factors`` (left out),
        ``per_factor``: factor name -> its MIG gap, SAP gap and DCI test accuracy,
        ``latent_factor``: the normalised MI matrix (D, F') with each latent's best factor
        (:func:`best_factors`), ``importance`` (DCI's, D x F'), ``sap_scores`` (D x F'), and
        ``settings``: bins, regressor, the train/test sizes and the seed.
    """
    codes, factors = _as_arrays(codes, factors)
    names = _factor_names(factor_names, factors.shape[1])
    mig_result = mig(codes, factors, bins)
    dci_result = dci(codes, factors, regressor, test_fraction, seed)
    sap_result = sap(codes, factors, test_fraction, seed)
    used = mig_result["factors_used"]
    used_names = [names[k] for k in used]
    per_factor = {
        name: {
            "mig": mig_result["mig_per_factor"][i],
            "sap": sap_result["sap_per_factor"][i],
            "dci_test_accuracy": dci_result["test_accuracy_per_factor"][i],
        }
        for i, name in enumerate(used_names)
    }
    return {
        **{key: (mig_result | dci_result | sap_result)[key] for key in SCORE_KEYS},
        "dci_informativeness_train": dci_result["dci_informativeness_train"],
        "num_codes": int(codes.shape[0]),
        "latent_dim": int(codes.shape[1]),
        "factor_names": used_names,
        "constant_factors": [names[k] for k in range(len(names)) if k not in used],
        "per_factor": per_factor,
        "latent_factor": {
            "score": "normalized mutual information MI(z_j; v_k) / H(v_k)",
            "matrix": mig_result["normalized_mi"],
            "best_factor": best_factors(mig_result["normalized_mi"], used_names),
        },
        "importance": dci_result["importance"],
        "sap_scores": sap_result["score_matrix"],
        "settings": {
            "mig": mig_result["settings"],
            "dci": dci_result["settings"],
            "sap": sap_result["settings"],
        },
    }
