"""A VQ-VAE's second stage: fitting priors over its code grids and measuring them.

The training split's code grids fit the model's own prior (``model.prior``: a gated PixelCNN by
default) and, as the baseline it must beat, each position's code frequencies; their bits per
code on the validation and test codes say how well each predicts codes it was not fitted to
(log2 K bits for a uniform guess). The end of training (``training/code_prior_callback.py``)
and ``scripts/fit_prior.py`` both go through :func:`fit_code_priors`.

Plain torch (and OmegaConf, for the baseline's shipped config), so it works in a notebook::

    model, cfg = load_run("runs/vqvae")
    codes = encode_splits(model, load_data(cfg))          # {"train": (N, h, w), ...}
    fitted = fit_code_priors(model, codes)
    print(prior_metrics(fitted))                          # test/prior_bits_per_code, ...
    images = model.decode(fitted[0].prior.sample(64))
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from vae_experiments.analysis.latent import encode_split
from vae_experiments.configs import CONFIG_DIR
from vae_experiments.data import ImageData, iterate_split
from vae_experiments.models import LatentModel
from vae_experiments.models.code_priors import CodePrior, PriorRecipe, bits_per_code
from vae_experiments.pictures import image_grid
from vae_experiments.targets import ConfigError, instantiate

#: Where the shipped prior configs are: ``model/prior=<name>``.
PRIOR_CONFIG_DIR = Path(CONFIG_DIR) / "model" / "prior"
#: The baseline every run's prior is reported beside.
BASELINE = "frequencies"
#: The splits whose bits per code are reported (the prior is fitted to ``train``).
REPORTED_SPLITS = ("val", "test")


def check_discrete(model: LatentModel, what: str) -> None:
    """Raises ``ValueError`` unless ``model`` has code grids (a VQ-VAE), saying what ``what``
    (the command or function) needs."""
    if not getattr(model, "discrete_codes", False):
        raise ValueError(
            f"{what} fits a prior over a VQ-VAE's code grids (model=vqvae), and this run's "
            f"model is {type(model).__name__}; sample an autoencoder's or a VAE's codes with "
            "scripts/sample.py"
        )


def prior_names() -> list[str]:
    """The shipped prior configs (``configs/model/prior/*.yaml``), by name."""
    return sorted(path.stem for path in PRIOR_CONFIG_DIR.glob("*.yaml"))


def shipped_recipe(name: str) -> PriorRecipe:
    """The recipe of ``configs/model/prior/<name>.yaml`` with its shipped settings.

    Raises:
        ConfigError: naming ``prior`` when there is no such config.
    """
    path = PRIOR_CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError("prior", name, f"must be one of {', '.join(prior_names())}")
    return instantiate(OmegaConf.load(path), key="prior")


def encode_splits(
    model: LatentModel,
    data: ImageData,
    splits: Iterable[str] = ("train", *REPORTED_SPLITS),
    batch_size: int | None = None,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """The code grids (N, h, w) of every image of each split, in order, on the model's device."""
    device = model.device if device is None else device
    return {
        split: encode_split(model, iterate_split(data, split, batch_size, device))
        for split in splits
    }


def code_usage(codes: torch.Tensor, num_codes: int) -> dict[str, float]:
    """How code grids (N, h, w) use a codebook of ``num_codes``: ``codes_in_use`` (codes that
    occur at least once) and ``perplexity`` (exp of the entropy of the codes' histogram: K for
    uniform use), over all the grids at once (training logs them per batch)."""
    counts = torch.bincount(codes.flatten().cpu(), minlength=num_codes).double()
    probabilities = counts / counts.sum()
    entropy = -(probabilities * probabilities.clamp_min(1e-300).log()).sum()
    return {"codes_in_use": int((counts > 0).sum()), "perplexity": float(entropy.exp())}


def split_bits_per_code(
    model: LatentModel,
    data: ImageData,
    split: str,
    limit: int | None = None,
    batch_size: int | None = None,
) -> float:
    """Bits per code of the model's attached prior (``model.code_prior``) on the code grids of
    a split's images (its first ``limit``; None: all)."""
    codes = encode_split(model, iterate_split(data, split, batch_size, model.device))
    return bits_per_code(model.code_prior, codes[:limit])


@dataclass
class FittedPrior:
    """A prior fitted to training codes, with how well it predicts each split's codes."""

    recipe: PriorRecipe
    prior: CodePrior
    #: Bits per code on each split measured (``val``, ``test``: codes it was not fitted to).
    bits_per_code: dict[str, float]

    @property
    def name(self) -> str:
        """The kind of prior (``pixelcnn``, ``frequencies``): what its files are called after."""
        return self.recipe.name


def fit_code_priors(
    model: LatentModel,
    codes: Mapping[str, torch.Tensor],
    recipe: PriorRecipe | None = None,
    seed: int = 0,
) -> list[FittedPrior]:
    """Fits a prior to ``codes["train"]`` and measures it on the other splits' codes.

    Args:
        model: a VQ-VAE (for its codebook size and default prior).
        codes: code grids (N, h, w) per split; ``train`` is required, ``val`` (if there) picks
            among a PixelCNN's epochs.
        recipe: the prior to fit; None: the model's own (``model.prior``).
        seed: seeds the prior's initial weights and its batches.

    Returns:
        The prior asked for first, then the per-position frequencies baseline (unless the
        prior asked for is that).
    """
    check_discrete(model, "fit_code_priors")
    recipe = model.prior_recipe if recipe is None else recipe
    recipes = [recipe]
    if recipe.name != BASELINE:
        recipes.append(shipped_recipe(BASELINE))
    fitted = []
    for each in recipes:
        prior = each.fit(codes["train"], model.num_codes, val_codes=codes.get("val"), seed=seed)
        measured = {
            split: bits_per_code(prior, codes[split]) for split in REPORTED_SPLITS if split in codes
        }
        fitted.append(FittedPrior(each, prior, measured))
    return fitted


def prior_metrics(fitted: Sequence[FittedPrior]) -> dict[str, float]:
    """metrics.json's keys for :func:`fit_code_priors`' result: ``<split>/prior_bits_per_code``
    for the prior asked for (what the run samples from) and
    ``<split>/frequencies_bits_per_code`` for the baseline (both when they are the same)."""
    metrics = {f"{split}/prior_bits_per_code": v for split, v in fitted[0].bits_per_code.items()}
    for each in fitted:
        if each.name == BASELINE:
            metrics.update(
                {f"{split}/{BASELINE}_bits_per_code": v for split, v in each.bits_per_code.items()}
            )
    return metrics


@torch.no_grad()
def sample_grid(
    model: LatentModel, prior: CodePrior, n: int, seed: int = 0, label: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decodes ``n`` code grids drawn from ``prior`` (seeded): the images (n, C, H, W) and their
    picture, rows of ``ceil(sqrt(n))`` (:func:`~vae_experiments.pictures.image_grid`), ``label``
    on the left of the first row (as the other sample grids: ``pixelcnn samples``)."""
    was_training = model.training
    model.eval()
    try:
        generator = torch.Generator().manual_seed(seed)
        codes = prior.to(model.device).sample(n, generator=generator)
        images = model.decode(codes)
    finally:
        model.train(was_training)
    rows = list(images.split(math.ceil(math.sqrt(n))))
    labels = [label] + [""] * (len(rows) - 1) if label else None
    return images, image_grid(rows, row_labels=labels)
