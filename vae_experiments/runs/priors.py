"""A VQ-VAE's second stage in its run directory: ``prior.pt``, the prior over code grids fitted
to the codes of one of the run's checkpoints.

The file holds the prior's recipe (the config node that builds it), its weights, the checkpoint
whose codes it was fitted to (file and global step) and its bits per code. A fit that replaces
it keeps the earlier file as ``prior.earlier-<n>.pt``. It is loaded with ``weights_only=True``
and built through :mod:`vae_experiments.targets` (only classes we ship), and attached only to
the checkpoint it was fitted to: other weights encode images to other codes, and their decoder
reads codes otherwise.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vae_experiments.models.code_priors import CodePrior, PriorRecipe
from vae_experiments.runs.files import atomic_write
from vae_experiments.runs.layout import EARLIER_PRIOR_PATTERN, PRIOR_FILE
from vae_experiments.targets import instantiate

log = logging.getLogger(__name__)

#: The layout of ``prior.pt``'s record; a file of another format is not read.
PRIOR_FORMAT = 1


def fit_prior_command(run_dir: str | Path, checkpoint: str | Path | None = None) -> str:
    """The command that fits a prior for ``run_dir`` (and one of its checkpoints)."""
    command = f"python scripts/fit_prior.py run={run_dir}"
    name = Path(checkpoint).stem if checkpoint is not None else None
    return f"{command} checkpoint={name}" if name in ("best", "last") else command


def fitted_to(run_dir: str | Path, checkpoint: str | Path | None, step: int) -> dict[str, Any]:
    """What ``prior.pt`` records of the weights whose codes a prior was fitted to: the
    checkpoint (relative to the run directory where it is inside it; None: weights not saved)
    and its global step, which :func:`load_prior` compares."""
    if checkpoint is None:
        return {"checkpoint": None, "global_step": int(step)}
    path, run_dir = Path(checkpoint).resolve(), Path(run_dir).resolve()
    shown = path.relative_to(run_dir) if path.is_relative_to(run_dir) else path
    return {"checkpoint": str(shown), "global_step": int(step)}


def save_prior(
    run_dir: str | Path,
    prior: CodePrior,
    recipe: PriorRecipe,
    fitted_to: Mapping[str, Any],
    bits_per_code: Mapping[str, float],
) -> Path:
    """Writes ``<run_dir>/prior.pt`` (atomically); an existing one is kept as
    ``prior.earlier-<n>.pt``.

    Args:
        run_dir: the run directory.
        prior: the fitted prior.
        recipe: what built it (its :meth:`~PriorRecipe.config` is saved).
        fitted_to: the checkpoint whose codes it was fitted to (:func:`fitted_to`).
        bits_per_code: the prior's bits per code on each split it was measured on.

    Returns:
        The file written.
    """
    run_dir = Path(run_dir)
    path = run_dir / PRIOR_FILE
    record = {
        "format": PRIOR_FORMAT,
        "recipe": recipe.config(),
        "grid_shape": list(prior.grid_shape),
        "num_codes": prior.num_codes,
        "state_dict": {key: value.detach().cpu() for key, value in prior.state_dict().items()},
        "fitted_to": dict(fitted_to),
        "bits_per_code": {split: float(value) for split, value in bits_per_code.items()},
    }
    if path.is_file():
        number = 1
        while (run_dir / EARLIER_PRIOR_PATTERN.format(number)).exists():
            number += 1
        shutil.copy2(path, run_dir / EARLIER_PRIOR_PATTERN.format(number))
    with atomic_write(path, "wb") as file:
        torch.save(record, file)
    return path


def read_prior_record(run_dir: str | Path) -> dict[str, Any] | None:
    """``prior.pt``'s record (weights_only), or None when the run has none.

    Raises:
        ValueError: the file cannot be read, or is no prior record of this version.
    """
    path = Path(run_dir) / PRIOR_FILE
    if not path.is_file():
        return None
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path} cannot be read ({reason})") from None
    if not isinstance(record, dict) or record.get("format") != PRIOR_FORMAT:
        raise ValueError(f"{path} holds no prior record of format {PRIOR_FORMAT}")
    return record


def load_prior(
    run_dir: str | Path,
    checkpoint: str | Path,
    global_step: int,
    grid_shape: Sequence[int],
    num_codes: int,
) -> CodePrior | None:
    """The run's prior over code grids for the weights of ``checkpoint`` (at ``global_step``),
    in eval mode on the CPU; None, with a warning that says what to run, when the run has no
    ``prior.pt`` fitted to that step, or it cannot be read or built.

    Args:
        run_dir: the run directory.
        checkpoint: the checkpoint loaded (for the messages).
        global_step: its global step, which the prior's must equal.
        grid_shape: the model's code grid (h, w).
        num_codes: the model's codebook size.
    """
    command = fit_prior_command(run_dir, checkpoint)
    try:
        record = read_prior_record(run_dir)
    except ValueError as error:
        log.warning("%s; the model gets no prior: fit one with %s", error, command)
        return None
    if record is None:
        return None
    fitted_to = record.get("fitted_to", {})
    if int(fitted_to.get("global_step", -1)) != int(global_step):
        log.warning(
            "%s was fitted to the codes of %s at step %s; %s is at step %d, whose codes differ, so "
            "the model gets no prior: fit one for it with %s",
            Path(run_dir) / PRIOR_FILE,
            fitted_to.get("checkpoint", "another checkpoint"),
            fitted_to.get("global_step", "?"),
            Path(checkpoint).name,
            global_step,
            command,
        )
        return None
    if list(record["grid_shape"]) != list(grid_shape) or record["num_codes"] != num_codes:
        log.warning(
            "%s is a prior over %s grids of %s codes, not this model's %s of %s; the model gets "
            "no prior: fit one with %s",
            Path(run_dir) / PRIOR_FILE,
            record["grid_shape"],
            record["num_codes"],
            list(grid_shape),
            num_codes,
            command,
        )
        return None
    try:
        recipe = instantiate(record["recipe"], key="prior")
        if not isinstance(recipe, PriorRecipe):
            raise TypeError(f"{type(recipe).__name__} is no prior recipe")
        prior = recipe.build(grid_shape, num_codes)
        prior.load_state_dict(record["state_dict"])
    except Exception as error:  # a foreign target, changed classes: the run still loads
        log.warning(
            "%s cannot be built (%s); the model gets no prior: fit one with %s",
            Path(run_dir) / PRIOR_FILE,
            str(error).splitlines()[0] if str(error) else type(error).__name__,
            command,
        )
        return None
    return prior.eval()
