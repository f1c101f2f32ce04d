"""``python scripts/evaluate.py run=<run dir or .ckpt>``: likelihood evaluation of a trained VAE,
and the quality of any model's samples.

Computes the IWAE estimate of log p(x) with ``k`` samples, the ELBO from the same samples, the
posterior gap log p(x) - ELBO, the bounds L_j for smaller j, KL, the reconstruction term, bits
per dimension and active units on a split (or its first ``max_images`` images), and says what
the log p(x) is: a log-likelihood of the data's pixels, a log-density (Gaussian, Laplace), or no
likelihood of them (Bernoulli on grey pixels), with bits per dimension only for the first;
merges ``{split}/log_px``, ``{split}/log_px_k``, ``{split}/log_px_images``,
``{split}/posterior_gap``, ``{split}/bound_gap``, ``{split}/bpd`` (a likelihood only) and
``{split}/active_units`` into the run's ``metrics.json`` and TensorBoard (the run's summary: the
latest evaluation of a split wins there; in TensorBoard ``{split}/log_px`` carries the
likelihood's unit, ``test/log_px [discretized_logistic]``, as training's terms do; for a
conditional model, a CVAE, the log-likelihood is log p(x | y) given the images' labels, merged as
``{split}/log_px_given_y`` and ``{split}/bpd_given_y``). For every model
that samples (a VAE from its prior, an autoencoder through a density fitted to its codes, as
``scripts/sample.py`` fits it), it also measures ``quality.samples`` samples against as many of
the split's images in the features of a classifier of the dataset
(:mod:`vae_experiments.analysis.quality`): ``{split}/fd_classifier``, ``{split}/sample_precision``,
``{split}/sample_recall`` and ``{split}/quality_samples`` (and ``{split}/fid_inception`` with
``quality.inception_weights``). On data with known factors (``data=shapes``), it scores the
disentanglement of the model's codes (posterior means) of the split against the factors
(:mod:`vae_experiments.analysis.disentanglement`): ``{split}/disentanglement.mig``,
``.dci_disentanglement``, ``.dci_completeness``, ``.dci_informativeness``, ``.sap`` and
``.images``, with the estimators' settings and each latent's factor in the record. It writes
the whole evaluation, with the checkpoint and ``k`` that made it, into a new folder for this call,
``<run>/analysis/evaluate-<checkpoint>-<split>-k<k>/`` (``_1``, ``_2``, ... when that name is
taken: an earlier evaluation's files are never replaced)::

    evaluate_<split>.json     the evaluation record
    evaluate.log              Hydra's log of the call
    evaluate.yaml             the call's command line and config
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from vae_experiments.analysis.disentanglement import METRIC_PREFIX, SCORE_KEYS
from vae_experiments.cli.common import (
    UsageError,
    analysis_dir,
    int_setting,
    register_resolvers,
    resolve_device,
    run_call,
    run_dir_of,
)
from vae_experiments.cli.did_you_mean import suggest_keys_on_failure
from vae_experiments.configs import CONFIG_DIR

#: metrics.json / TensorBoard keys this command adds, after the split name.
METRIC_KEYS = (
    "log_px",
    "log_px_k",
    "log_px_images",
    "posterior_gap",
    "bound_gap",
    "bpd",
    "active_units",
)
#: metrics.json / TensorBoard keys of the sample quality, after the split name, and the key of
#: :func:`~vae_experiments.analysis.quality.measure_samples`'s result each holds.
QUALITY_KEYS = {
    "fd_classifier": "fd_classifier",
    "sample_precision": "precision",
    "sample_recall": "recall",
    "quality_samples": "num_samples",
    "fid_inception": "fid_inception",
}
#: metrics.json / TensorBoard keys of the disentanglement metrics (data with factors), after
#: ``{split}/`` and :data:`~vae_experiments.analysis.disentanglement.METRIC_PREFIX`
#: (``test/disentanglement.mig``): the scores of :func:`~vae_experiments.analysis.
#: disentanglement.disentanglement_scores`, and the images scored.
DISENTANGLEMENT_KEYS = (*SCORE_KEYS, "images")
#: What quality.density may be: the model's own prior, or a density fitted to its codes.
QUALITY_DENSITIES = ("auto", "prior", "gmm", "diag_gaussian")
#: The metrics.json names of a conditional model's (CVAE's) numbers that differ in meaning: its
#: log-likelihood is log p(x | y), not comparable with a VAE's log p(x).
CONDITIONAL_KEYS = {"log_px": "log_px_given_y", "bpd": "bpd_given_y"}
#: How the table writes the conditional model's terms: (unconditional, conditional).
CONDITIONAL_TERMS = (
    ("p(x|z)", "p(x|z,y)"),
    ("q(z|x)", "q(z|x,y)"),
    ("p(z|x)", "p(z|x,y)"),
    ("log p(x)", "log p(x|y)"),
)
#: Defaults of eval.max_batch_elems (see configs/evaluate.yaml): small chunks stay in a CPU's
#: cache; a GPU wants large calls.
CPU_MAX_BATCH_ELEMS = 2**22
GPU_MAX_BATCH_ELEMS = 2**26
log = logging.getLogger(__name__)


register_resolvers()


def _of_latent_dims(results: dict[str, Any]) -> str:
    """``of 16``, or ``of 150 (per layer: 30 of 100, 8 of 50)`` for a stack of latent layers."""
    dims = results["latent_dims"]
    if len(dims) == 1:
        return f"of {dims[0]}"
    layers = ", ".join(
        f"{n} of {d}" for n, d in zip(results["active_units_per_layer"], dims, strict=True)
    )
    return f"of {sum(dims)} (per layer: {layers})"


def metric_key(key: str, conditional: bool) -> str:
    """The metrics.json name (after the split) of an evaluation's ``key``
    (:data:`CONDITIONAL_KEYS` for a conditional model)."""
    return CONDITIONAL_KEYS.get(key, key) if conditional else key


def conditional_text(text: str) -> str:
    """``text`` of the table with log p(x) and friends written as conditioned on y."""
    for plain, conditioned in CONDITIONAL_TERMS:
        text = text.replace(plain, conditioned)
    return text


def bits_per_dim_row(results: dict[str, Any]) -> tuple[str, str, str]:
    """The table's bits/dim row: the number where log p(x) is a likelihood of the data, else
    why there is none."""
    if results["bpd"] is None:
        return ("bits/dim", "-", f"none: log p(x) is {results['log_px_is']}")
    return ("bits/dim", f"{results['bpd']:.4f}", "")


def format_table(
    results: dict[str, Any], training: dict[str, Any], split: str, training_k: int = 1
) -> str:
    """The evaluation as a small text table (nats per image).

    Args:
        results: this evaluation's metrics (:func:`evaluate_vae` plus ``latent_dims``).
        training: the run's ``metrics.json``, whose ``<split>/elbo`` (and ``iwae_bound``)
            training logged.
        split: the evaluated split.
        training_k: the samples per image the run trained with (``model.k``).
    """
    k = results["log_px_k"]
    rows = [
        (f"log p(x), IWAE k={k}", f"{results['log_px']:.3f}", "nats/image"),
        ("ELBO, same samples", f"{results['elbo']:.3f}", ""),
        ("posterior gap", f"{results['posterior_gap']:.3f}", "log p(x) - ELBO = KL(q || p(z|x))"),
        ("recon, -log p(x|z)", f"{results['recon']:.3f}", ""),
        ("KL(q(z|x) || p(z))", f"{results['kl']:.3f}", ""),
        bits_per_dim_row(results),
        ("active units", f"{results['active_units']}", _of_latent_dims(results)),
    ]
    if results["bounds"]:
        gaps = ", ".join(f"{j}: {results['log_px'] - b:.3f}" for j, b in results["bounds"].items())
        rows.append(("log p(x) - L_j, j samples", "", gaps))
    # What training logged on this split, with as many samples per image as it trained with.
    samples = "one sample" if training_k == 1 else f"{training_k} samples"
    if f"{split}/elbo" in training:
        note = f"training's estimate, {samples} per image"
        rows.append((f"training's {split}/elbo", f"{training[f'{split}/elbo']:.3f}", note))
    if f"{split}/iwae_bound" in training:
        note = f"training's objective, IWAE k={training_k}"
        rows.append(
            (f"training's {split}/iwae_bound", f"{training[f'{split}/iwae_bound']:.3f}", note)
        )
    footer = f"log p(x) is {results['log_px_note']}"
    if results.get("conditional"):
        rows = [tuple(conditional_text(part) for part in row) for row in rows]
        footer = conditional_text(footer) + (
            "\n  every number is conditioned on the images' labels y (a conditional model)"
        )
    width = max(len(name) for name, _, _ in rows)
    table = "\n".join(
        f"  {name:<{width}}  {value:>10}  {note}".rstrip() for name, value, note in rows
    )
    # Loud where log p(x) is no likelihood of the data: a number in nats reads like one.
    flag = "" if results["log_px_is"] == "likelihood" else "WARNING: "
    return f"{table}\n  {flag}{footer}"


def quality_settings(cfg: DictConfig) -> dict[str, Any] | None:
    """The ``quality:`` settings checked, or None when ``quality.samples=0`` turns it off.

    Raises:
        UsageError: a bad value, naming its key and what it may be.
    """
    quality = cfg.get("quality")
    if quality is None:
        return None
    samples = quality.get("samples")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise UsageError(
            f"quality.samples must be an integer >= 0 (0: no sample quality), got "
            f"quality.samples={samples}"
        )
    if samples == 0:
        return None
    if quality.density not in QUALITY_DENSITIES:
        raise UsageError(
            f"quality.density must be one of {', '.join(QUALITY_DENSITIES)}, got "
            f"quality.density={quality.density}"
        )
    for key in ("components", "k", "batch_size"):
        value = quality.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"quality.{key} must be an integer >= 1, got quality.{key}={value}")
    weights = quality.get("inception_weights")
    if weights is not None:
        from vae_experiments.analysis.quality import check_inception

        try:
            check_inception(weights)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return {
        "samples": samples,
        "density": str(quality.density),
        "components": int(quality.components),
        "k": int(quality.k),
        "batch_size": int(quality.batch_size),
        "inception_weights": None if weights is None else str(weights),
    }


def sampler_of(model: Any, density: str, has_codes: bool) -> str:
    """What a model's samples come from under ``quality.density``: ``prior`` (its own
    ``sample``) or the density to fit to its codes.

    Raises:
        UsageError: ``prior`` for a model without one, or a density for a model without codes.
    """
    has_prior = bool(getattr(model, "has_prior", False))
    if getattr(model, "discrete_codes", False):  # a VQ-VAE: its prior over code grids
        if density not in ("auto", "prior"):
            raise UsageError(
                f"quality.density={density}: {type(model).__name__}'s codes are grids of "
                "codebook indices, no vector to fit a density to; it samples from its prior over "
                "code grids: quality.density=prior (or auto)"
            )
        if model.code_prior is None:
            raise UsageError(
                f"{type(model).__name__} has no prior over the codes of this checkpoint to "
                "sample from (the run has no prior.pt, or one fitted to another checkpoint): "
                "fit one with python "
                "scripts/fit_prior.py run=<run dir>, or leave sample quality out with "
                "quality.samples=0"
            )
        return "prior"
    if density == "auto":
        return "prior" if has_prior else "gmm"
    if density == "prior" and not has_prior:
        raise UsageError(
            f"quality.density=prior: {type(model).__name__} has no prior to sample from; use "
            "quality.density=gmm or diag_gaussian (a density fitted to its codes) or auto"
        )
    if density != "prior" and not has_codes:
        raise UsageError(
            f"quality.density={density}: {type(model).__name__} has no code vector to fit a "
            "density to; use quality.density=prior (or auto)"
        )
    return density


def disentanglement_settings(cfg: DictConfig) -> dict[str, Any] | None:
    """The ``disentanglement:`` settings checked, or None when ``disentanglement.images=0``
    turns the metrics off (they run only on data with factors).

    Raises:
        UsageError: a bad value, naming its key and what it may be.
    """
    from vae_experiments.analysis.disentanglement import DCI_REGRESSORS

    node = cfg.get("disentanglement")
    if node is None:
        return None
    images = node.get("images")
    if isinstance(images, bool) or not isinstance(images, int) or images < 0:
        raise UsageError(
            "disentanglement.images must be an integer >= 0 (0: no disentanglement metrics), "
            f"got disentanglement.images={images}"
        )
    if images == 0:
        return None
    if images < 10:
        raise UsageError(
            f"disentanglement.images={images}: the metrics hold out a part of the codes to test "
            "their predictors and need at least 10 images; use 1000 or more for numbers to report"
        )
    bins = node.get("bins")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise UsageError(
            f"disentanglement.bins must be an integer >= 2, got disentanglement.bins={bins}"
        )
    if node.get("regressor") not in DCI_REGRESSORS:
        raise UsageError(
            f"disentanglement.regressor must be one of {', '.join(DCI_REGRESSORS)}, got "
            f"disentanglement.regressor={node.get('regressor')}"
        )
    fraction = node.get("test_fraction")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise UsageError(
            "disentanglement.test_fraction must be a number between 0 and 1 (exclusive), got "
            f"disentanglement.test_fraction={fraction}"
        )
    return {
        "images": images,
        "bins": bins,
        "regressor": str(node.regressor),
        "test_fraction": float(fraction),
    }


def measure_disentanglement(
    model: Any,
    datamodule: Any,
    settings: dict[str, Any],
    split: str,
    num_images: int,
    batch_size: int,
    seed: int,
    device: str,
) -> dict[str, Any]:
    """MIG, DCI and SAP (:func:`~vae_experiments.analysis.disentanglement.
    disentanglement_scores`) of the model's codes (``encode``: a VAE's posterior means) of the
    split's first ``min(settings["images"], num_images)`` images against their factor labels
    (N, F); with ``images`` and ``seconds``."""
    from vae_experiments.analysis.disentanglement import disentanglement_scores
    from vae_experiments.analysis.latent import encode_split
    from vae_experiments.runs import iterate_split

    n = min(settings["images"], num_images)

    def batches():
        left = n  # the split's first n images, in order
        for x, y in iterate_split(datamodule, split, batch_size, device):
            if left <= 0:
                break
            yield x[:left], y[:left]
            left -= len(x)

    start = time.perf_counter()
    codes, factors = encode_split(model, batches(), return_labels=True)
    if factors.ndim != 2:
        raise UsageError(
            f"the {split} split's labels have shape {tuple(factors.shape)}, not (N, factors): "
            "the data names factors but does not label the images with them"
        )
    try:
        scores = disentanglement_scores(
            codes,
            factors,
            datamodule.factor_names,
            bins=settings["bins"],
            regressor=settings["regressor"],
            test_fraction=settings["test_fraction"],
            seed=seed,
        )
    except ValueError as exc:  # e.g. every factor constant among these images
        raise UsageError(
            f"no disentanglement metrics of the {split} split's first {n} images: {exc}; "
            "disentanglement.images=0 leaves them out"
        ) from None
    scores["images"] = int(codes.shape[0])
    scores["seconds"] = round(time.perf_counter() - start, 3)
    return scores


def format_disentanglement_table(scores: dict[str, Any], split: str) -> str:
    """The disentanglement metrics as a small text table, with what each latent captures most
    and the estimators' settings."""
    settings = scores["settings"]
    dci, sap = settings["dci"], settings["sap"]
    rows = [
        ("MIG", f"{scores['mig']:.4f}", f"{settings['mig']['bins']} equal-width bins per latent"),
        (
            "DCI disentanglement",
            f"{scores['dci_disentanglement']:.4f}",
            f"{dci['regressor']} per factor",
        ),
        ("DCI completeness", f"{scores['dci_completeness']:.4f}", ""),
        (
            "DCI informativeness",
            f"{scores['dci_informativeness']:.4f}",
            f"test accuracy ({dci['num_train']} codes train, {dci['num_test']} test)",
        ),
        ("SAP", f"{scores['sap']:.4f}", "one-latent linear classifiers' accuracy gap"),
    ]
    width = max(len(name) for name, _, _ in rows)
    table = "\n".join(
        f"  {name:<{width}}  {value:>10}  {note}".rstrip() for name, value, note in rows
    )
    lines = [""]
    for j, best in enumerate(scores["latent_factor"]["best_factor"]):
        item = f"z{j}: {best}"
        if lines[-1] and len(lines[-1]) + len(item) > 90:
            lines.append("")
        lines[-1] += f", {item}" if lines[-1] else item
    captures = "\n".join(f"    {line}" for line in lines)
    left_out = (
        f"; constant, left out: {', '.join(scores['constant_factors'])}"
        if scores["constant_factors"]
        else ""
    )
    return (
        f"Disentanglement: the codes (posterior means) of {scores['images']} {split} images "
        f"against their factors ({', '.join(scores['factor_names'])}{left_out}), seed "
        f"{dci['seed']}, SAP's split as DCI's ({sap['num_test']} held out):\n{table}\n"
        f"  the factor each latent carries most of (normalised mutual information):\n{captures}"
    )


def dataset_classifier(quality_data: Any, device: str) -> Any:
    """The dataset's classifier (:func:`~vae_experiments.analysis.classifier.
    load_or_train_classifier`: trained and cached on first use), before any long work.

    Args:
        quality_data: the run's data source without binarisation (set up).
        device: where it trains and runs.

    Raises:
        UsageError: a cached file that does not load (named).
        UnlabelledDataError: the data has a single label.
    """
    import torch

    from vae_experiments.analysis.classifier import (
        UnlabelledDataError,
        load_or_train_classifier,
    )
    from vae_experiments.data.batches import TensorImages
    from vae_experiments.data.cache import cache_dir_of
    from vae_experiments.runs import load_split

    def uint8_split(name: str):
        dataset = quality_data.splits[name]
        if isinstance(dataset, TensorImages):
            return dataset.images, dataset.labels
        x, y = load_split(quality_data, name)
        return x.mul(255).round_().to(torch.uint8), y

    train_x, train_y = uint8_split("train")
    test_x, test_y = uint8_split("test")
    name = type(quality_data.source).__name__.lower()
    cache = cache_dir_of(quality_data.source)
    try:
        classifier = load_or_train_classifier(train_x, train_y, test_x, test_y, cache, name, device)
    except UnlabelledDataError:
        raise
    except ValueError as exc:  # a corrupt cache file
        raise UsageError(str(exc)) from None
    log.info(
        "%s classifier: test accuracy %.4f (%s)",
        name,
        classifier.test_accuracy,
        "trained now" if classifier.trained else "cached",
    )
    return classifier


def measure_run_samples(
    model: Any,
    datamodule: Any,
    quality_data: Any,
    classifier: Any,
    settings: dict[str, Any],
    split: str,
    seed: int,
    device: str,
) -> dict[str, Any]:
    """The sample quality of a loaded run (see :func:`vae_experiments.analysis.quality.
    measure_samples`).

    Args:
        model: the run's model.
        datamodule: the run's data, as the model was trained on it (codes are fitted to it).
        quality_data: the same source without binarisation: the held-out images the samples
            are compared with (and the training images of the reference row).
        classifier: from :func:`dataset_classifier`.
        settings: from :func:`quality_settings`.
        split: the held-out split.
        seed: seeds the density's EM and the samples.
        device: where everything runs.

    Returns:
        The measurements, plus ``sampler``, ``density`` and ``classifier`` (its file, test
        accuracy, whether this call trained it).
    """
    import torch

    from vae_experiments.analysis.latent import DecodedDensity, encode_split, fit_density
    from vae_experiments.analysis.quality import measure_samples
    from vae_experiments.runs import iterate_split, load_split

    n = min(settings["samples"], len(quality_data.splits[split]))
    kind = sampler_of(model, settings["density"], hasattr(model, "encode"))
    name = classifier.info["dataset"]
    if kind == "prior":
        sampler = model
    else:
        codes = encode_split(
            model, iterate_split(datamodule, "train", settings["batch_size"], device)
        )
        sampler = DecodedDensity(model, fit_density(kind, codes, settings["components"], seed))
    real, _ = load_split(quality_data, split, device=device, limit=n)
    reference, _ = load_split(quality_data, "train", device=device, limit=n)
    generator = torch.Generator(device=device).manual_seed(seed)
    result = measure_samples(
        sampler,
        classifier.model,
        real,
        n,
        settings["k"],
        settings["batch_size"],
        generator,
        reference=reference,
        inception_weights=settings["inception_weights"],
    )
    density = (
        "prior"
        if kind == "prior"
        else f"{kind}" + (f" ({settings['components']} components)" if kind == "gmm" else "")
    )
    return {
        **result,
        "sampler": kind,
        "density": density,
        "k": settings["k"],
        "classifier": {
            "path": str(classifier.path),
            "dataset": name,
            "test_accuracy": classifier.test_accuracy,
            "trained_now": classifier.trained,
            "features": int(classifier.model.feature_layer[0].out_features),
        },
    }


def format_quality_table(quality: dict[str, Any], split: str) -> str:
    """The sample quality as a small text table, with what a perfect generator scores."""
    classifier = quality["classifier"]
    k = quality["k"]
    rows = [
        ("Fréchet distance", f"{quality['fd_classifier']:.4f}", "in the classifier's features"),
        (f"precision, k={k}", f"{quality['precision']:.4f}", "samples that look like data"),
        (f"recall, k={k}", f"{quality['recall']:.4f}", f"{split} images the samples cover"),
    ]
    if quality.get("fid_inception") is not None:
        rows.append(("FID (Inception-v3)", f"{quality['fid_inception']:.3f}", "as papers report"))
    if quality.get("reference_fd_classifier") is not None:
        rows.append(
            (
                "training images instead",
                f"{quality['reference_fd_classifier']:.4f}",
                f"precision {quality['reference_precision']:.4f}, recall "
                f"{quality['reference_recall']:.4f}: a perfect generator, at this count",
            )
        )
    width = max(len(name) for name, _, _ in rows)
    table = "\n".join(
        f"  {name:<{width}}  {value:>10}  {note}".rstrip() for name, value, note in rows
    )
    return (
        f"Sample quality: {quality['num_samples']} samples ({quality['density']}) against "
        f"{quality['num_real']} {split} images, in the {classifier['features']} features of a "
        f"{classifier['dataset']} classifier (test accuracy {classifier['test_accuracy']:.4f}; "
        f"{classifier['path']}); not the Inception FID of papers:\n{table}"
    )


def evaluate(cfg: DictConfig, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Runs the evaluation of ``cfg`` (``configs/evaluate.yaml``) and writes its outputs.

    Args:
        cfg: the command's config.
        out_dir: where this call's files go; None claims a new folder under
            ``<run>/analysis/`` (:func:`~vae_experiments.cli.common.analysis_dir`), as the
            command does.

    Returns:
        The evaluation record written to ``<out_dir>/evaluate_<split>.json``.
    """
    import torch
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from vae_experiments.analysis.classifier import UnlabelledDataError
    from vae_experiments.analysis.likelihood import check_vae, evaluate_vae
    from vae_experiments.runs import (
        CHECKPOINT_CHOICES,
        EVALUATE_RECORD_PATTERN,
        METRICS_FILE,
        after_earlier_event_files,
        find_checkpoint,
        iterate_split,
        load_data,
        load_run,
        read_metrics,
        tensorboard_dir,
        write_json_atomic,
    )
    from vae_experiments.units import LIKELIHOOD_KEY, likelihood_unit, unit_tag

    # Every setting is checked before the checkpoint is read, and the run before anything is
    # written: a mistake leaves nothing behind (main() removes the call's empty folder).
    run_dir = run_dir_of(cfg.run)
    if cfg.split not in ("train", "val", "test"):
        raise UsageError(f"split must be train, val or test, got split={cfg.split}")
    if cfg.checkpoint not in CHECKPOINT_CHOICES:
        raise UsageError(f"checkpoint must be best or last, got checkpoint={cfg.checkpoint}")
    k = int_setting("k", cfg.k)  # importance samples per image
    int_setting("seed", cfg.seed, minimum=0)
    device = resolve_device(cfg.device)
    max_batch_elems = int_setting(
        "eval.max_batch_elems", cfg.eval.max_batch_elems, null="chosen for the device"
    )
    if max_batch_elems is None:
        max_batch_elems = GPU_MAX_BATCH_ELEMS if device.startswith("cuda") else CPU_MAX_BATCH_ELEMS
    int_setting("eval.batch_size", cfg.eval.batch_size, null="the run's data.batch_size")
    max_images = int_setting("max_images", cfg.get("max_images"), null="the whole split")

    quality = quality_settings(cfg)
    disentanglement = disentanglement_settings(cfg)

    try:
        ckpt_path = find_checkpoint(cfg.run, cfg.checkpoint)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    model, run_cfg = load_run(ckpt_path, map_location=device)
    not_a_vae = None  # why the model has no likelihood to evaluate
    try:
        check_vae(model)
    except ValueError as exc:
        not_a_vae = f"{exc} (run={cfg.run}); quality.samples=0 leaves nothing to evaluate"
        if quality is None and disentanglement is None:
            raise UsageError(not_a_vae) from exc
    is_vae = not_a_vae is None  # else the quality of its samples (and its codes) alone
    if quality is not None:
        sampler_of(model, quality["density"], hasattr(model, "encode"))
    datamodule = load_data(run_cfg)
    # Data with known factors (ImageData.factor_names): the disentanglement of the model's codes.
    if getattr(datamodule, "factor_names", None) is None or disentanglement is None:
        disentanglement = None
    elif getattr(model, "discrete_codes", False) or not hasattr(model, "encode"):
        log.warning(
            "no disentanglement metrics: %s has no code vector per image", type(model).__name__
        )
        disentanglement = None
    elif getattr(model, "latent_dim", 2) < 2:
        raise UsageError(
            f"the disentanglement metrics compare latents and need at least 2, the run has "
            f"latent_dim={model.latent_dim}; disentanglement.images=0 leaves them out"
        )
    if not is_vae and quality is None and disentanglement is None:  # data without factors
        raise UsageError(not_a_vae)
    batch_size = int(cfg.eval.batch_size or datamodule.batch_size)
    num_images = len(datamodule.splits[cfg.split])
    if max_images is not None:
        num_images = min(num_images, max_images)
    if quality is not None:
        # The classifier and the images compared with are the source's own, not binarised; a
        # corrupt cache or unlabelled data fails here, before the likelihood's long work.
        quality_data = (
            datamodule if datamodule.binarize == "none" else load_data(run_cfg, binarize="none")
        )
        n = min(quality["samples"], len(quality_data.splits[cfg.split]))
        if n < quality["k"] + 1:
            raise UsageError(
                f"the {cfg.split} split has {n} images: precision and recall with quality.k="
                f"{quality['k']} need at least {quality['k'] + 1}"
            )
        try:
            classifier = dataset_classifier(quality_data, device)
        except UnlabelledDataError as exc:
            if not is_vae and disentanglement is None:
                raise UsageError(f"no sample quality of {type(model).__name__}: {exc}") from None
            # What worked before sample quality existed still does: the likelihood alone.
            log.warning("no sample quality: %s; quality.samples=0 skips this warning", exc)
            quality = None
    if out_dir is None:  # claimed once every check has passed
        out_dir = analysis_dir(cfg.run, "evaluate", cfg.checkpoint, cfg.split, f"k{k}")
    out_dir = Path(out_dir)

    results: dict[str, Any] = {}
    seconds = 0.0
    if is_vae:
        log.info(
            "evaluating %s (%s) on the %s split: %d images, k=%d, device %s",
            run_dir,
            ckpt_path.name,
            cfg.split,
            num_images,
            k,
            device,
        )
        generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
        start = time.perf_counter()
        with tqdm(total=num_images, unit="img", desc=f"IWAE k={k}", dynamic_ncols=True) as bar:

            def batches():
                left = num_images  # the split's first num_images images, in order
                for x, y in iterate_split(datamodule, cfg.split, batch_size, device):
                    if left <= 0:
                        break
                    x, y = x[:left], y[:left]
                    left -= len(x)
                    yield x, y  # the labels: a conditional model's log p(x | y)
                    bar.update(len(x))  # after the batch was evaluated

            results = evaluate_vae(model, batches(), k, max_batch_elems, generator)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        results["latent_dims"] = list(model.latent_dims)
        results["log_px_images"] = results["num_images"]
    else:
        log.info("%s is no VAE: no likelihood to evaluate, only its samples", type(model).__name__)

    sample_quality = None
    if quality is not None:
        start = time.perf_counter()
        sample_quality = measure_run_samples(
            model, datamodule, quality_data, classifier, quality, cfg.split, int(cfg.seed), device
        )
        sample_quality["seconds"] = round(time.perf_counter() - start, 3)
    disentanglement_scores = None
    if disentanglement is not None:
        disentanglement_scores = measure_disentanglement(
            model,
            datamodule,
            disentanglement,
            cfg.split,
            num_images,
            batch_size,
            int(cfg.seed),
            device,
        )
    prior_bits = None
    if getattr(model, "discrete_codes", False) and model.code_prior is not None:
        from vae_experiments.analysis.code_prior import split_bits_per_code

        # A VQ-VAE's likelihood of codes: its prior's, on this split's codes.
        prior_bits = split_bits_per_code(model, datamodule, cfg.split, num_images, batch_size)

    record = {
        "run": str(run_dir.resolve()),
        "checkpoint": str(ckpt_path.resolve()),
        "split": cfg.split,
        "k": k,
        "seed": int(cfg.seed),
        "device": device,
        "max_batch_elems": max_batch_elems,
        "batch_size": batch_size,
        "seconds": round(seconds, 3),
        "images_per_second": round(num_images / seconds, 3) if is_vae else None,
        "metrics": results,
        "likelihood": type(model.likelihood).__name__,
        "sample_quality": sample_quality,
        "prior_bits_per_code": prior_bits,
        "disentanglement": disentanglement_scores,
    }
    if is_vae and results["log_px_is"] != "likelihood":
        log.warning("log p(x) of %s is %s", run_dir, results["log_px_note"])
    # Before metrics.json: the run's summary never holds a value that no record explains.
    record_path = out_dir / EVALUATE_RECORD_PATTERN.format(cfg.split)
    write_json_atomic(record_path, record)

    metrics_path = run_dir / METRICS_FILE
    metrics = read_metrics(run_dir) if metrics_path.is_file() else {}
    new, dropped = {}, set()
    if is_vae:
        conditional = results["conditional"]
        new = {
            f"{cfg.split}/{metric_key(key, conditional)}": results[key]
            for key in METRIC_KEYS
            if results[key] is not None
        }
        # No bits/dim where log p(x) is no likelihood of the data, nor an earlier call's beside it.
        dropped = {
            f"{cfg.split}/{metric_key(key, conditional)}"
            for key in METRIC_KEYS
            if results[key] is None
        }
    if sample_quality is not None:
        for key, source in QUALITY_KEYS.items():
            if sample_quality[source] is not None:
                new[f"{cfg.split}/{key}"] = sample_quality[source]
            else:  # no Inception FID this time: an earlier call's is not this evaluation's
                dropped.add(f"{cfg.split}/{key}")
    if prior_bits is not None:
        new[f"{cfg.split}/prior_bits_per_code"] = prior_bits
    if disentanglement_scores is not None:
        for key in DISENTANGLEMENT_KEYS:
            new[f"{cfg.split}/{METRIC_PREFIX}{key}"] = disentanglement_scores[key]
    kept = {key: value for key, value in metrics.items() if key not in dropped}
    write_json_atomic(metrics_path, {**kept, **new})
    step = int(metrics.get("steps", 0))  # where training's test/* points are
    events_dir = tensorboard_dir(run_dir)
    unit = likelihood_unit(OmegaConf.select(run_cfg, LIKELIHOOD_KEY))
    # At the step of an earlier evaluation's points: TensorBoard keeps the file read last.
    after_earlier_event_files(events_dir)
    with SummaryWriter(log_dir=str(events_dir)) as writer:
        for tag, value in new.items():
            if not math.isnan(value):
                writer.add_scalar(unit_tag(tag, unit), value, global_step=step)

    if is_vae:
        print(
            f"\n{run_dir} ({ckpt_path.name}), {cfg.split} split: {num_images} images, "
            f"{seconds:.1f} s ({num_images / seconds:.1f} images/s)\n"
            + format_table(results, metrics, cfg.split, int(getattr(model, "k", 1)))
        )
    if sample_quality is not None:
        print(
            f"\n{run_dir} ({ckpt_path.name}), {sample_quality['seconds']:.1f} s\n"
            + format_quality_table(sample_quality, cfg.split)
        )
    if disentanglement_scores is not None:
        print(
            f"\n{run_dir} ({ckpt_path.name}), {disentanglement_scores['seconds']:.1f} s\n"
            + format_disentanglement_table(disentanglement_scores, cfg.split)
        )
    if prior_bits is not None:
        h, w = model.grid_shape
        print(
            f"\nprior over codes ({type(model.code_prior).__name__}, prior.pt): "
            f"{prior_bits:.4f} bits per code on the {cfg.split} split's {h}x{w} code grids "
            f"({math.log2(model.num_codes):.2f} for a uniform guess over the codebook)"
        )
    log.info("added %s to %s", ", ".join(new), metrics_path)
    log.info("wrote %s and TensorBoard scalars to %s", record_path, events_dir)
    print(f"this call's outputs are in {out_dir}")
    return record


@suggest_keys_on_failure(CONFIG_DIR, "evaluate")
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """``python scripts/evaluate.py run=<run dir or .ckpt> [k=5000] [split=test] ...``."""
    run_call("evaluate", cfg, lambda out_dir: evaluate(cfg, out_dir))
