"""``python scripts/evaluate.py run=<run dir or .ckpt>``: likelihood evaluation of a trained VAE.

Computes the IWAE estimate of log p(x) with ``k`` samples, the ELBO from the same samples, the
posterior gap log p(x) - ELBO, the bounds L_j for smaller j, KL, the reconstruction term, bits
per dimension and active units on a split (or its first ``max_images`` images), and says what
the log p(x) is: a log-likelihood of the data's pixels, a log-density (Gaussian, Laplace), or no
likelihood of them (Bernoulli on grey pixels), with bits per dimension only for the first;
merges ``{split}/log_px``, ``{split}/log_px_k``, ``{split}/log_px_images``,
``{split}/posterior_gap``, ``{split}/bound_gap``, ``{split}/bpd`` (a likelihood only) and
``{split}/active_units`` into the run's ``metrics.json`` and TensorBoard (for a conditional
model, a CVAE, the log-likelihood is log p(x | y) given the images' labels, merged as
``{split}/log_px_given_y`` and ``{split}/bpd_given_y``) (the run's summary: the
latest evaluation of a split wins there), and writes the whole evaluation, with the checkpoint
and ``k`` that made it, into a new folder for this call,
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
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vae_experiments.cli.common import (
    analysis_dir,
    discard_unused,
    register_resolvers,
    resolve_device,
    run_dir_of,
    save_call,
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


class UsageError(ValueError):
    """A bad command line: reported as one line, without a traceback."""


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

    from vae_experiments.analysis.likelihood import check_vae, evaluate_vae
    from vae_experiments.runs import (
        CHECKPOINT_CHOICES,
        METRICS_FILE,
        find_checkpoint,
        iterate_split,
        load_data,
        load_run,
        read_metrics,
        write_json_atomic,
    )

    run_dir = run_dir_of(cfg.run)
    if cfg.split not in ("train", "val", "test"):
        raise UsageError(f"split must be train, val or test, got split={cfg.split}")
    if cfg.checkpoint not in CHECKPOINT_CHOICES:
        raise UsageError(f"checkpoint must be best or last, got checkpoint={cfg.checkpoint}")
    k = int(cfg.k)
    if k < 1:
        raise UsageError(f"k (importance samples per image) must be >= 1, got k={cfg.k}")
    try:
        device = resolve_device(cfg.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    max_batch_elems = cfg.eval.max_batch_elems
    if max_batch_elems is None:
        max_batch_elems = GPU_MAX_BATCH_ELEMS if device.startswith("cuda") else CPU_MAX_BATCH_ELEMS
    if int(max_batch_elems) < 1:
        raise UsageError(f"eval.max_batch_elems must be >= 1, got {cfg.eval.max_batch_elems}")
    max_batch_elems = int(max_batch_elems)
    max_images = cfg.get("max_images")
    if max_images is not None and (
        isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1
    ):
        raise UsageError(
            f"max_images must be null (the whole split) or an integer >= 1, "
            f"got max_images={max_images}"
        )

    ckpt_path = find_checkpoint(cfg.run, cfg.checkpoint)
    model, run_cfg = load_run(ckpt_path, map_location=device)
    try:
        check_vae(model)
    except ValueError as exc:
        raise UsageError(f"{exc} (run={cfg.run})") from exc
    if out_dir is None:
        out_dir = analysis_dir(cfg.run, "evaluate", cfg.checkpoint, cfg.split, f"k{k}")
    out_dir = Path(out_dir)
    datamodule = load_data(run_cfg)
    batch_size = int(cfg.eval.batch_size or datamodule.batch_size)
    num_images = len(datamodule.splits[cfg.split])
    if max_images is not None:
        num_images = min(num_images, max_images)
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
        "images_per_second": round(num_images / seconds, 3),
        "metrics": results,
        "likelihood": type(model.likelihood).__name__,
    }
    if results["log_px_is"] != "likelihood":
        log.warning("log p(x) of %s is %s", run_dir, results["log_px_note"])
    # Before metrics.json: the run's summary never holds a value that no record explains.
    record_path = out_dir / f"evaluate_{cfg.split}.json"
    write_json_atomic(record_path, record)

    metrics_path = run_dir / METRICS_FILE
    metrics = read_metrics(run_dir) if metrics_path.is_file() else {}
    conditional = results["conditional"]
    new = {
        f"{cfg.split}/{metric_key(key, conditional)}": results[key]
        for key in METRIC_KEYS
        if results[key] is not None
    }
    # No bits/dim where log p(x) is no likelihood of the data, nor an earlier call's beside it.
    dropped = {
        f"{cfg.split}/{metric_key(key, conditional)}" for key in METRIC_KEYS if results[key] is None
    }
    kept = {key: value for key, value in metrics.items() if key not in dropped}
    write_json_atomic(metrics_path, {**kept, **new})
    step = int(metrics.get("steps", 0))
    with SummaryWriter(log_dir=str(run_dir / "tensorboard")) as writer:
        for tag, value in new.items():
            if not math.isnan(value):
                writer.add_scalar(tag, value, global_step=step)

    print(
        f"\n{run_dir} ({ckpt_path.name}), {cfg.split} split: {num_images} images, "
        f"{seconds:.1f} s ({num_images / seconds:.1f} images/s)\n"
        + format_table(results, metrics, cfg.split, int(getattr(model, "k", 1)))
    )
    log.info("added %s to %s", ", ".join(new), metrics_path)
    log.info("wrote %s and TensorBoard scalars to %s", record_path, run_dir / "tensorboard")
    print(f"this call's outputs are in {out_dir}")
    return record


@suggest_keys_on_failure(CONFIG_DIR, "evaluate")
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """``python scripts/evaluate.py run=<run dir or .ckpt> [k=5000] [split=test] ...``."""
    out_dir = HydraConfig.get().runtime.output_dir  # this call's own folder (configs/evaluate.yaml)
    save_call(out_dir, "evaluate", cfg, list(HydraConfig.get().overrides.task))
    try:
        evaluate(cfg, out_dir)
    except BaseException as exc:
        discard_unused(out_dir, "evaluate")  # stopped before writing: leave no folder behind
        if isinstance(exc, UsageError):
            raise SystemExit(f"error: {exc}") from None
        raise
