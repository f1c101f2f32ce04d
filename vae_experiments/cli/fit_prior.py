"""``python scripts/fit_prior.py run=<VQ-VAE run dir>``: fit a VQ-VAE's prior over code grids.

A VQ-VAE's second stage (training fits one at its end too): encodes the run's splits with a
checkpoint, fits a prior to the training split's code grids (the run's own ``model.prior``, a
gated PixelCNN by default, or ``prior=<name>`` of ``configs/model/prior/``) and the per-position
code frequencies beside it (the baseline), and reports their bits per code on the validation and
test codes. Writes

    <run dir>/prior.pt          the prior, marked with the checkpoint's step (an earlier one is
                                kept as prior.earlier-<n>.pt): what load_run attaches and
                                ``scripts/sample.py density=prior`` draws from
    <run dir>/metrics.json      {val,test}/prior_bits_per_code, {val,test}/frequencies_bits_per_code

and into a new folder for this call, ``<run dir>/analysis/fit_prior-<checkpoint>-<prior>/``::

    samples_<prior>.png       draws from each prior, decoded
    fit_prior.json            the record: checkpoint, prior, bits per code, the codes' use
    fit_prior.log, fit_prior.yaml

The run directory is locked while the command writes it (``runs/lock.py``): not while it
trains. A mistake (no VQ-VAE, an unknown prior, a locked run) is one ``error:`` line, exit status
2, and leaves no folder behind.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from vae_experiments.cli.common import (
    UsageError,
    analysis_dir,
    register_resolvers,
    resolve_device,
    run_call,
    run_dir_of,
)
from vae_experiments.cli.did_you_mean import suggest_keys_on_failure
from vae_experiments.configs import CONFIG_DIR

#: ``prior=`` that means the run's own (``model.prior`` of its config.yaml).
OWN = "own"
RECORD_FILE = "fit_prior.json"
log = logging.getLogger(__name__)

register_resolvers()  # ${analysis_dir:...} in configs/fit_prior.yaml, before Hydra composes it


def _recipe(model: Any, prior: str, epochs: int | None) -> Any:
    """The recipe that ``prior=`` and ``epochs=`` ask for, checked against the model's grid."""
    from vae_experiments.analysis.code_prior import prior_names, shipped_recipe
    from vae_experiments.targets import ConfigError, instantiate

    if prior == OWN:
        recipe = model.prior_recipe
    elif prior in prior_names():
        recipe = shipped_recipe(prior)
    else:
        raise UsageError(
            f"prior={prior} is invalid: must be {OWN} (the run's model.prior) or one of "
            f"{', '.join(prior_names())}"
        )
    if epochs is not None:
        if "epochs" not in vars(recipe):
            raise UsageError(
                f"epochs={epochs}: the {recipe.name} prior is fitted by counting, not in epochs; "
                "leave epochs out"
            )
        try:
            recipe = instantiate({**recipe.config(), "epochs": epochs}, key="prior")
        except ConfigError as error:
            raise UsageError(str(error).replace("prior.epochs", "epochs")) from None
    try:
        recipe.check(model.grid_shape, model.num_codes)
    except ConfigError as error:
        raise UsageError(f"{error.under('model.prior')} (prior={prior})") from None
    return recipe


def fit_prior(
    run: str | Path,
    checkpoint: str = "best",
    prior: str = OWN,
    epochs: int | None = None,
    n: int = 64,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 1000,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Fits a prior over a VQ-VAE run's code grids and writes its files (module docstring).

    Args: as the keys of ``configs/fit_prior.yaml``, and
        out_dir: where this call's files go; None claims a new folder under
            ``<run dir>/analysis/`` (:func:`~vae_experiments.cli.common.analysis_dir`).

    Returns:
        What ``<out_dir>/fit_prior.json`` holds.

    Raises:
        UsageError: the run is no VQ-VAE, ``prior=``/``epochs=``/``n=`` is bad, the run is locked
            or has no such checkpoint; nothing was written.
    """
    from vae_experiments.analysis.code_prior import (
        check_discrete,
        code_usage,
        encode_splits,
        fit_code_priors,
        prior_metrics,
        sample_grid,
    )
    from vae_experiments.pictures import save_grid
    from vae_experiments.runs import (
        METRICS_FILE,
        find_checkpoint,
        load_data,
        load_run,
        lock,
        read_metrics,
        write_json_atomic,
    )
    from vae_experiments.runs.load import check_checkpoint
    from vae_experiments.runs.priors import fitted_to, save_prior

    run_dir = run_dir_of(run)
    if n < 1:
        raise UsageError(f"n={n} is invalid: must be an integer >= 1 (images in the sample grid)")
    try:
        ckpt = find_checkpoint(run, checkpoint)
        device = resolve_device(device)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    model, cfg = load_run(ckpt, map_location=device, code_prior=False)
    try:
        check_discrete(model, "scripts/fit_prior.py")
    except ValueError as error:
        raise UsageError(f"run={run}: {error}") from None
    recipe = _recipe(model, prior, epochs)
    step, _ = check_checkpoint(ckpt)
    try:
        claim = lock.acquire(run_dir)
    except lock.RunLocked as error:
        raise UsageError(str(error)) from None
    try:
        if out_dir is None:
            out_dir = analysis_dir(run, "fit_prior", checkpoint, prior)
        out_dir = Path(out_dir)
        start = time.perf_counter()
        data = load_data(cfg, batch_size=batch_size)
        codes = encode_splits(model, data, device=device)
        h, w = model.grid_shape
        usage = code_usage(codes["train"], model.num_codes)
        log.info(
            "%s: %dx%d code grids of %d codes; training codes: %d codes in use, perplexity %.1f",
            ckpt,
            h,
            w,
            model.num_codes,
            usage["codes_in_use"],
            usage["perplexity"],
        )
        fitted = fit_code_priors(model, codes, recipe, seed=seed)
        prior_path = save_prior(
            run_dir,
            fitted[0].prior,
            fitted[0].recipe,
            fitted_to(run_dir, ckpt, step),
            fitted[0].bits_per_code,
        )
        pictures = {}
        for each in fitted:
            _, grid = sample_grid(model, each.prior, n, seed, f"{each.name} samples")
            pictures[each.name] = str(save_grid(grid, out_dir / f"samples_{each.name}.png"))
        new = prior_metrics(fitted)
        metrics_path = run_dir / METRICS_FILE
        metrics = read_metrics(run_dir) if metrics_path.is_file() else {}
        write_json_atomic(metrics_path, {**metrics, **new})
        _log_scalars(run_dir, new, int(metrics.get("steps", 0)))
    finally:
        claim.release()

    record = {
        "run": str(run_dir.resolve()),
        "checkpoint": str(ckpt.resolve()),
        "global_step": step,
        "grid_shape": [h, w],
        "num_codes": model.num_codes,
        "train_codes": usage,
        "priors": {
            each.name: {"recipe": each.recipe.config(), "bits_per_code": each.bits_per_code}
            for each in fitted
        },
        "saved": {"prior": fitted[0].name, "file": str(prior_path)},
        "samples": pictures,
        "units": "bits per code: -log2 p(code grid) / (h * w), averaged over the grids",
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_json_atomic(out_dir / RECORD_FILE, record)
    rows = [
        f"| {each.name}{' (saved)' if index == 0 else ''} | "
        + " | ".join(f"{each.bits_per_code.get(split, math.nan):.4f}" for split in ("val", "test"))
        + " |"
        for index, each in enumerate(fitted)
    ]
    print(
        f"Priors over the {h}x{w} code grids of {run_dir} ({ckpt.name}, step {step}), "
        f"{model.num_codes} codes ({math.log2(model.num_codes):.2f} bits per code for a uniform "
        f"guess); training codes: {usage['codes_in_use']} codes in use, perplexity "
        f"{usage['perplexity']:.1f}\n"
        "| prior | val bits/code | test bits/code |\n| --- | --- | --- |\n" + "\n".join(rows)
    )
    print(f"wrote {prior_path} and added {', '.join(new)} to {metrics_path}")
    for path in [*pictures.values(), out_dir / RECORD_FILE]:
        print(f"wrote {path}")
    print(f"this call's outputs are in {out_dir}")
    return record


def _log_scalars(run_dir: Path, values: dict[str, float], step: int) -> None:
    """Adds ``values`` (bits per code: in no likelihood's unit) to the run's TensorBoard scalars
    at ``step``, where training's test points are, as evaluate.py does."""
    from torch.utils.tensorboard import SummaryWriter

    from vae_experiments.runs import after_earlier_event_files, tensorboard_dir

    events_dir = tensorboard_dir(run_dir)
    after_earlier_event_files(events_dir)  # a later point at the same step wins
    with SummaryWriter(log_dir=str(events_dir)) as writer:
        for tag, value in values.items():
            writer.add_scalar(tag, value, global_step=step)


@suggest_keys_on_failure(CONFIG_DIR, "fit_prior")
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="fit_prior")
def main(cfg: DictConfig) -> None:
    """``python scripts/fit_prior.py run=<VQ-VAE run dir> [prior=own] [epochs=...] ...``."""
    run_call(
        "fit_prior",
        cfg,
        lambda out_dir: fit_prior(
            run=cfg.run,
            checkpoint=cfg.checkpoint,
            prior=cfg.prior,
            epochs=cfg.epochs,
            n=cfg.n,
            seed=cfg.seed,
            device=cfg.device,
            batch_size=cfg.batch_size,
            out_dir=out_dir,
        ),
        refused=(UsageError,),
    )
