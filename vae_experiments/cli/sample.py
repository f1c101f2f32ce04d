"""``python scripts/sample.py run=<run dir> density=gmm n=64``: sample from a latent density.

Encodes the run's training split, fits a density to the codes (``gmm``, ``diag_gaussian``, or
for a VAE its ``prior``), decodes ``n`` draws, and writes into a new folder for this call,
``<run dir>/analysis/sample-<checkpoint>-<density>-c<components>/`` (``_1``, ``_2``, ... when
that name is taken: an earlier call's files are never replaced)::

    samples_<density>.png     the decoded draws; for a conditional model (a CVAE), rows per
                              class asked (``label=3``, ``label=[3,5]``, a class name, or all),
                              labelled with its name: density=prior decodes the same draws in
                              every class, a fitted density is fitted to each class's codes
    traversal.png             one row per latent dimension, swept from its 5% to 95% quantile,
                              labelled on the left with the range ("z3: -1.6 to 1.7"); for a
                              conditional model, of the first class asked and its codes
    latent_scatter.png        test codes coloured by label (2-D codes, or their PCA projection)
    latent_densities.json     test-split log-likelihood of the codes under every density
    sample.log
    sample.yaml               the call's command line and config

A VQ-VAE's codes are grids of codebook indices: ``density=prior`` draws them from the run's
fitted prior (``prior.pt``, ``scripts/fit_prior.py``), ``density=frequencies`` from each position's
code frequencies, fitted now; the call writes ``samples_<density>.png`` and ``code_priors.json``
(the test codes' bits per code under each).

``density=auto``, the default, is ``prior`` for a VQ-VAE (it has nothing else to sample through)
and ``gmm`` for every other model, and the folder is named by what it became.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

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
from vae_experiments.targets import format_value, to_container

DENSITIES_FILE = "latent_densities.json"
log = logging.getLogger(__name__)

#: ``density=auto``: what a run's samples come from when the command line names no density.
AUTO_DENSITY = "auto"


def auto_density(run: str | Path | None, density: str) -> str:
    """``density`` as the call uses it (also an OmegaConf resolver, which names the call's
    folder): ``auto`` is ``prior`` for a run whose model has discrete codes (a VQ-VAE: its
    fitted prior over code grids) and ``gmm`` for every other model; any other value as given.

    Reads the run's ``config.yaml`` only. A run that cannot be read gives ``gmm``: the command
    then reports what is wrong with ``run=`` in its own words, before writing anything.
    """
    if density != AUTO_DENSITY:
        return density
    from hydra.utils import get_class

    from vae_experiments.runs.files import load_config

    try:
        model_class = get_class(str(load_config(run_dir_of(run)).model._target_))
    except Exception:  # noqa: BLE001 - any unreadable run: sample_latents says why
        return "gmm"
    return "prior" if getattr(model_class, "discrete_codes", False) else "gmm"


register_resolvers()  # ${analysis_dir:...} in configs/sample.yaml, before Hydra composes it
if not OmegaConf.has_resolver("auto_density"):
    OmegaConf.register_new_resolver("auto_density", auto_density, use_cache=True)


def sample_latents(
    run: str | Path,
    density: str = AUTO_DENSITY,
    components: int = 10,
    n: int = 64,
    checkpoint: str = "best",
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 1000,
    traversal_steps: int = 9,
    traversal_dims: int | None = 16,
    out_dir: str | Path | None = None,
    label: int | str | Sequence[int | str] | None = None,
) -> dict[str, Any]:
    """Fits latent densities to a run's training codes and writes the pictures and the table.

    Args: as the keys of ``configs/sample.yaml``, and
        out_dir: where the files go; None claims a new folder under ``<run dir>/analysis/``
            (:func:`~vae_experiments.cli.common.analysis_dir`), as the command does.
        label: for a conditional model, the classes to draw (indices or names; None: all).

    Raises:
        UsageError: a ``label`` the model or its data do not have.

    Returns:
        What ``<out_dir>/latent_densities.json`` holds.

    Raises:
        UsageError: for a bad setting, or a density the run's model has not (``prior`` of an
            autoencoder), before anything is written.
    """
    import torch

    from vae_experiments.analysis.latent import (
        DENSITIES,
        StandardNormal,
        decode_classes,
        encode_split,
        fit_density,
        heldout_log_likelihood,
        latent_traversal,
        traversal_labels,
    )
    from vae_experiments.analysis.latent_plots import latent_scatter
    from vae_experiments.pictures import image_grid, save_grid
    from vae_experiments.runs import (
        CHECKPOINT_CHOICES,
        find_checkpoint,
        iterate_split,
        load_data,
        load_run,
        write_json_atomic,
    )

    # Every setting is checked before the checkpoint is read, and the model before anything
    # is written: a mistake leaves nothing behind (main() removes the call's empty folder).
    run_dir = run_dir_of(run)
    if density not in [AUTO_DENSITY, *DENSITIES, *CODE_DENSITIES]:
        raise UsageError(
            f"density must be one of {', '.join([AUTO_DENSITY, *DENSITIES, *CODE_DENSITIES])} "
            f"(auto: a VQ-VAE's prior, else gmm; prior: a VAE's own, or a VQ-VAE's fitted prior; "
            f"{CODE_DENSITIES[1]}: a VQ-VAE's), got density={density}"
        )
    if checkpoint not in CHECKPOINT_CHOICES:
        raise UsageError(f"checkpoint must be best or last, got checkpoint={checkpoint}")
    for key, value in (("n", n), ("components", components), ("batch_size", batch_size)):
        int_setting(key, value)
    int_setting("seed", seed, minimum=0)
    int_setting("traversal_steps", traversal_steps, minimum=2)
    int_setting("traversal_dims", traversal_dims, null="all of them")
    device = resolve_device(device)
    try:
        ckpt = find_checkpoint(run, checkpoint)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    model, cfg = load_run(ckpt, map_location=device)
    if label is not None and not model.needs_labels:
        raise UsageError(
            f"label={format_value(label)}: {type(model).__name__} is not conditioned on labels; "
            "leave label out (label= is for conditional models, model=cvae)"
        )
    if density == AUTO_DENSITY:  # as auto_density names the command's folder
        density = "prior" if model.discrete_codes else "gmm"
    if model.discrete_codes:  # a VQ-VAE: priors over code grids, not densities over vectors
        return sample_code_grids(
            model, cfg, run, ckpt, density, components, n, checkpoint, seed, batch_size, out_dir
        )
    if density not in [*DENSITIES, "prior"]:
        raise UsageError(
            f"density={density} is for a VQ-VAE's code grids; the model of run={run} is "
            f"{type(model).__name__}: choose one of {', '.join([*DENSITIES, 'prior'])}"
        )
    if density == "prior" and not model.has_prior:
        raise UsageError(
            f"density=prior is only for models trained with one (VAEs); the model of run={run} "
            f"is {type(model).__name__}: choose one of {', '.join(DENSITIES)}"
        )
    if out_dir is None:
        out_dir = analysis_dir(run, "sample", checkpoint, density, f"c{components}")
    out_dir = Path(out_dir)

    datamodule = load_data(cfg, batch_size=batch_size)
    classes = class_names = None
    if model.needs_labels:
        class_names = datamodule.class_names or [str(c) for c in range(model.num_classes)]
        classes = chosen_classes(label, class_names)
    train_codes, train_labels = encode_split(
        model, iterate_split(datamodule, "train", device=device), return_labels=True
    )
    test_codes, test_labels = encode_split(
        model, iterate_split(datamodule, "test", device=device), return_labels=True
    )
    log.info(
        "%s codes of size %d: %d train, %d test",
        type(model).__name__,
        model.latent_dim,
        len(train_codes),
        len(test_codes),
    )

    densities = {kind: fit_density(kind, train_codes, components, seed) for kind in DENSITIES}
    if model.has_prior and len(model.latent_dims) == 1:  # a stack's codes have no N(0, I) prior
        densities["prior"] = StandardNormal(model.latent_dim).fit(train_codes)
    heldout = {k: heldout_log_likelihood(d, test_codes) for k, d in densities.items()}
    fitted = {k: heldout_log_likelihood(d, train_codes) for k, d in densities.items()}

    # A conditional model's traversal is of the first class asked, over its codes' range.
    traversal_class, traversal_codes = None, train_codes
    if classes is not None:
        traversal_class = classes[0]
        traversal_codes = train_codes[train_labels.to(train_codes.device) == traversal_class]
        if len(traversal_codes) == 0:
            name = describe_class(traversal_class, class_names)
            raise UsageError(f"class {name} has no training images to sweep its codes over")
    generator = torch.Generator().manual_seed(seed)
    per_row = math.ceil(math.sqrt(n))
    if classes is None:
        with torch.no_grad():
            if density == "prior":  # through every latent layer of a stacked model
                samples = model.sample(n, generator=generator)
            else:
                samples = model.decode(densities[density].sample(n, generator=generator))
        rows = list(samples.split(per_row))
        labels = [f"{density} samples"] + [""] * (len(rows) - 1)  # what the grid is, once
        grid = image_grid(rows, row_labels=labels)
    else:
        # n draws shared out among the classes, each class's in whole rows.
        per_class = math.ceil(n / len(classes))
        per_row = min(per_row, per_class)
        per_class = math.ceil(per_class / per_row) * per_row
        if density == "prior":  # the same draws in every class: a column is one z
            z = model.sample_codes(per_class, generator=generator)
            class_images = decode_classes(model, z, classes)
        else:
            # A class's codes fill only part of the space (q(z | y), the codes of all classes
            # mixed): its draws come from the density fitted to its own training codes, as a
            # mixture of all would hand it other classes' codes.
            class_images = []
            for label_index in classes:
                codes = train_codes[train_labels.to(train_codes.device) == label_index]
                try:
                    fitted_class = fit_density(density, codes, components, seed)
                except ValueError as error:  # too few codes in the class
                    name = describe_class(label_index, class_names)
                    raise UsageError(f"class {name}'s training codes: {error}") from None
                z = fitted_class.sample(per_class, generator=generator).to(model.device)
                class_images += decode_classes(model, z, [label_index])
        rows, row_labels = [], []
        for label_index, images in zip(classes, class_images, strict=True):
            rows += list(images.split(per_row))
            row_labels += [class_names[label_index]] * (per_class // per_row)
        grid = image_grid(rows, row_labels=row_labels)
    paths = {"samples": save_grid(grid, out_dir / f"samples_{density}.png")}
    dims = None if traversal_dims is None else list(range(min(traversal_dims, model.latent_dim)))
    traversal = latent_traversal(
        model, traversal_codes, steps=traversal_steps, dims=dims, label=traversal_class
    )
    # Each row labelled with its dimension and the range swept: "z3: -1.6 to 1.7".
    labels = traversal_labels(traversal_codes, dims)
    paths["traversal"] = save_grid(
        image_grid(list(traversal.split(traversal_steps)), row_labels=labels),
        out_dir / "traversal.png",
    )
    scatter_labels, label_name = test_labels, "label"
    if test_labels.ndim == 2:  # factors (N, F): coloured by the first (the shape's, for shapes)
        names = datamodule.factor_names or ["factor 0"]
        scatter_labels, label_name = test_labels[:, 0], names[0]
    paths["latent_scatter"] = latent_scatter(
        test_codes,
        scatter_labels,
        out_dir / "latent_scatter.png",
        title=f"{type(model).__name__} test codes ({run_dir.name})",
        seed=seed,
        label_name=label_name,
    )

    result = {
        "run_dir": str(run_dir),
        "checkpoint": str(ckpt),
        "model": type(model).__name__,
        "latent_dim": model.latent_dim,
        "num_train_codes": len(train_codes),
        "num_test_codes": len(test_codes),
        "components": components,
        "seed": seed,
        "gmm_converged": densities["gmm"].converged_,
        "units": "mean log-density of a code, nats",
        "test_log_lik": heldout,
        "train_log_lik": fitted,
        "sampled": {"density": density, "n": n, "png": str(paths["samples"])},
    }
    if classes is not None:
        result["sampled"]["classes"] = [class_names[c] for c in classes]
        result["traversal_class"] = class_names[traversal_class]
    write_json_atomic(out_dir / DENSITIES_FILE, result)

    rows = [
        f"| {kind} | {heldout[kind]:.2f} | {fitted[kind]:.2f} |"
        for kind in sorted(heldout, key=heldout.get, reverse=True)
    ]
    print(
        f"Latent log-likelihood of {type(model).__name__} codes (nats per code, "
        f"{model.latent_dim} dims; gmm with {components} components):\n"
        "| density | test (held out) | train (fitted) |\n| --- | --- | --- |\n" + "\n".join(rows)
    )
    if classes is not None:
        shown = ", ".join(describe_class(c, class_names) for c in classes)
        print(f"classes drawn: {shown}; the traversal is of class {class_names[traversal_class]}")
    for path in [*paths.values(), out_dir / DENSITIES_FILE]:
        print(f"wrote {path}")
    print(f"this call's outputs are in {out_dir}")
    return result


def describe_class(index: int, class_names: Sequence[str]) -> str:
    """``7 (Sneaker)``, or ``7`` where the name is the number."""
    name = class_names[index]
    return str(index) if name == str(index) else f"{index} ({name})"


def chosen_classes(
    label: int | str | Sequence[int | str] | None, class_names: Sequence[str]
) -> list[int]:
    """The class indices that ``label=`` asks for: every class for None, else each item an
    index (``3``) or a class name (``Sneaker``, as the data name it).

    Raises:
        UsageError: naming the item that is no class, and the classes there are.
    """
    if label is None:
        return list(range(len(class_names)))
    items = list(label) if isinstance(label, Sequence) and not isinstance(label, str) else [label]
    chosen = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool) and 0 <= item < len(class_names):
            chosen.append(item)
        elif isinstance(item, str) and item in class_names:
            chosen.append(list(class_names).index(item))
        else:
            names = ", ".join(describe_class(i, class_names) for i in range(len(class_names)))
            raise UsageError(
                f"label={format_value(label)}: {format_value(item)} is not a class of the run's "
                f"data; give a class number or name of: {names} (or leave label out: all)"
            )
    if not chosen:
        raise UsageError("label=[]: give at least one class, or leave label out (all classes)")
    return chosen


#: What ``density=`` draws a VQ-VAE's code grids from: the run's fitted prior (prior.pt) or the
#: per-position code frequencies, fitted to the training codes by this call.
CODE_DENSITIES = ("prior", "frequencies")
CODE_PRIORS_FILE = "code_priors.json"


def sample_code_grids(
    model: Any,
    cfg: DictConfig,
    run: str | Path,
    ckpt: Path,
    density: str,
    components: int,
    n: int,
    checkpoint: str,
    seed: int,
    batch_size: int,
    out_dir: str | Path | None,
) -> dict[str, Any]:
    """:func:`sample_latents` for a VQ-VAE: decodes ``n`` code grids drawn from ``density``
    (:data:`CODE_DENSITIES`), writes ``samples_<density>.png`` and ``code_priors.json`` (the test
    codes' bits per code under the run's prior and the frequencies, the training codes' use)."""
    from vae_experiments.analysis.code_prior import (
        BASELINE,
        code_usage,
        encode_splits,
        sample_grid,
        shipped_recipe,
    )
    from vae_experiments.models.code_priors import bits_per_code
    from vae_experiments.pictures import save_grid
    from vae_experiments.runs import load_data, write_json_atomic
    from vae_experiments.runs.priors import fit_prior_command

    run_dir = run_dir_of(run)
    if density not in CODE_DENSITIES:
        raise UsageError(
            f"density={density}: a VQ-VAE's codes are grids of codebook indices; choose one of "
            f"{', '.join(CODE_DENSITIES)} (prior: the run's fitted prior over code grids, "
            f"prior.pt; {BASELINE}: each position's code frequencies, fitted now)"
        )
    if density == "prior" and model.code_prior is None:
        raise UsageError(
            f"{run_dir} has no prior over the codes of {ckpt.name} to sample from (no prior.pt, "
            f"or one fitted to another checkpoint): fit one with "
            f"{fit_prior_command(run_dir, ckpt)}, or sample the code "
            f"frequencies with density={BASELINE}"
        )
    if out_dir is None:
        out_dir = analysis_dir(run, "sample", checkpoint, density, f"c{components}")
    out_dir = Path(out_dir)
    codes = encode_splits(model, load_data(cfg, batch_size=batch_size), ("train", "test"))
    priors = {BASELINE: shipped_recipe(BASELINE).fit(codes["train"], model.num_codes)}
    if model.code_prior is not None:
        priors["prior"] = model.code_prior
    bits = {name: bits_per_code(prior, codes["test"]) for name, prior in priors.items()}
    drawn = priors[density] if density == BASELINE else model.code_prior
    _, grid = sample_grid(model, drawn, n, seed, f"{density} samples")
    png = save_grid(grid, out_dir / f"samples_{density}.png")
    h, w = model.grid_shape
    result = {
        "run_dir": str(run_dir),
        "checkpoint": str(ckpt),
        "model": type(model).__name__,
        "grid_shape": [h, w],
        "num_codes": model.num_codes,
        "train_codes": code_usage(codes["train"], model.num_codes),
        "units": "bits per code of the test codes: -log2 p(code grid) / (h * w)",
        "test_bits_per_code": bits,
        "seed": seed,
        "sampled": {"density": density, "n": n, "png": str(png)},
    }
    write_json_atomic(out_dir / CODE_PRIORS_FILE, result)
    rows = [f"| {name} | {value:.4f} |" for name, value in sorted(bits.items(), key=lambda x: x[1])]
    print(
        f"Test codes of {type(model).__name__} ({h}x{w} grids of {model.num_codes} codes), bits "
        "per code:\n| density | test |\n| --- | --- |\n" + "\n".join(rows)
    )
    for path in (png, out_dir / CODE_PRIORS_FILE):
        print(f"wrote {path}")
    print(f"this call's outputs are in {out_dir}")
    return result


@suggest_keys_on_failure(CONFIG_DIR, "sample")
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    run_call(
        "sample",
        cfg,
        lambda out_dir: sample_latents(
            run=cfg.run,
            density=cfg.density,
            components=cfg.components,
            n=cfg.n,
            checkpoint=cfg.checkpoint,
            seed=cfg.seed,
            device=cfg.device,
            batch_size=cfg.batch_size,
            traversal_steps=cfg.traversal_steps,
            traversal_dims=cfg.traversal_dims,
            out_dir=out_dir,
            label=to_container(cfg.get("label")),
        ),
    )
