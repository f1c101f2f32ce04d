"""``python scripts/compare_pca.py``: autoencoders against PCA at several latent sizes.

Each call writes into a directory of its own: by default a new
``outputs/compare_pca/<date>/<time>/`` (``_1``, ``_2``, ... for calls started in the same second),
and a ``hydra.run.dir=`` that already holds a comparison is refused, so that no comparison
overwrites another's tables, pictures or trained runs. The directory is locked for the call
(``runs/lock.py``), and the whole comparison is checked before anything is fitted or trained
(:func:`check_comparison`), and the latent sizes against PCA's once the data is read: a mistake
is one ``error:`` line, exit status 2, and the directory goes again (in one that existed, only
what the call wrote there).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from vae_experiments.cli import run_dirs
from vae_experiments.cli.did_you_mean import suggest_keys_on_failure, unknown_key_messages
from vae_experiments.configs import CONFIG_DIR
from vae_experiments.runs import lock
from vae_experiments.runs.layout import HYDRA_DIR
from vae_experiments.targets import ConfigError

log = logging.getLogger(__name__)
run_dirs.register_resolvers()  # ${run_dir:...} in configs/compare_pca.yaml

#: The folder of a comparison's trained runs, ``<out dir>/runs/<method>_k<latent size>/``.
RUNS_DIR = "runs"


def run_config(cfg: DictConfig, overrides: list[str], latent_dim: int) -> DictConfig:
    """``train.yaml`` for one method at one latent size.

    The comparison's data, trainer and seed are shared by every method; the method's own
    overrides come last, so a method may change e.g. its optimizer or batch size.

    Raises:
        ConfigError: for overrides that do not compose (an unknown key: the closest one).
    """
    method_overrides = list(overrides)
    overrides = [*overrides, f"model.latent_dim={latent_dim}"]
    try:
        run_cfg = hydra.compose(config_name="train", overrides=overrides)
    except ConfigCompositionException as error:
        hints = unknown_key_messages(CONFIG_DIR, "train", overrides)
        reason = "; ".join(hints) or str(error).strip().splitlines()[0]
        raise ConfigError(allowed=f"[{','.join(method_overrides)}]: {reason}") from None
    with open_dict(run_cfg):
        for key in ("data", "trainer", "seed", "threads"):
            run_cfg[key] = cfg[key]
        run_cfg.logger = {"_target_": None}
        run_cfg.trainer.enable_model_summary = False  # 12 runs, 12 tables of one module
        run_cfg.callbacks.image_grids.num_images = 0
        run_cfg.callbacks.latent_samples.enabled = False
    values = [o.lstrip("+") for o in overrides if "." in o.split("=", 1)[0]]
    return OmegaConf.merge(run_cfg, OmegaConf.from_dotlist(values))


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_comparison(cfg: DictConfig) -> None:
    """Raises ConfigError for a comparison that cannot run, before anything is fitted or
    trained: ``latent_dims``, ``num_images``, and each method's training config, composed as
    :func:`run_config` composes it and checked as ``train.py`` checks its own
    (:func:`~vae_experiments.cli.run_dirs.check_early`: its data, model and optimizer built
    once, reading no data)."""
    latent_dims = cfg.get("latent_dims")
    if not (
        isinstance(latent_dims, ListConfig) and latent_dims and all(map(_is_size, latent_dims))
    ):
        shown = (
            OmegaConf.to_container(latent_dims) if OmegaConf.is_config(latent_dims) else latent_dims
        )
        raise ConfigError(
            "latent_dims",
            shown,
            "must be a non-empty list of integers >= 1, e.g. latent_dims=[2,8,16,32]",
        )
    if not _is_size(cfg.get("num_images")):
        raise ConfigError("num_images", cfg.get("num_images"), "must be an integer >= 1")
    for method, overrides in cfg.methods.items():
        if not (isinstance(overrides, ListConfig) and all(isinstance(o, str) for o in overrides)):
            raise ConfigError(
                f"methods.{method}",
                OmegaConf.to_container(overrides) if OmegaConf.is_config(overrides) else overrides,
                "must be a list of train.py overrides, e.g. [model=ae,model/network=mlp]",
            )
        try:
            run_dirs.check_early(run_config(cfg, list(overrides), int(latent_dims[0])))
        except run_dirs.CONFIG_ERRORS as error:
            message = run_dirs.config_error_message(error)[0]
            raise ConfigError(allowed=f"methods.{method}: {message}") from None


@contextlib.contextmanager
def console_warnings_only() -> Iterator[None]:
    """Inside, the console shows warnings and errors only; the log file (``compare_pca.log``)
    still gets everything. A comparison trains a dozen runs: their per-epoch lines would bury
    the one line per job that says where the comparison stands."""
    consoles = [
        handler
        for handler in logging.getLogger().handlers
        if isinstance(handler, logging.StreamHandler)
        and not isinstance(handler, logging.FileHandler)
    ]
    levels = [handler.level for handler in consoles]
    for handler in consoles:
        handler.setLevel(max(handler.level, logging.WARNING))
    try:
        yield
    finally:
        for handler, level in zip(consoles, levels, strict=True):
            handler.setLevel(level)


def compare(cfg: DictConfig, out_dir: Path) -> list:
    """Runs the comparison and writes its files into ``out_dir``; returns the results."""
    import torch
    from torch.utils.tensorboard import SummaryWriter

    from vae_experiments.analysis.comparison import (
        Result,
        markdown_table,
        plot_error_vs_latent_dim,
        plot_reconstructions,
        write_csv,
    )
    from vae_experiments.analysis.pca import fit_pca
    from vae_experiments.models.base import squared_error
    from vae_experiments.runs import load_data, load_run, load_split
    from vae_experiments.training import train

    check_comparison(cfg)
    latent_dims = [int(k) for k in cfg.latent_dims]
    datamodule = load_data(cfg)
    train_x, _ = load_split(datamodule, "train")
    test_x, test_y = load_split(datamodule, "test")
    shown, shown_labels = test_x[: cfg.num_images], test_y[: cfg.num_images]

    pca = fit_pca(train_x)
    most = pca.components.shape[0]
    if max(latent_dims) > most:
        raise ConfigError(
            "latent_dims",
            latent_dims,
            f"PCA of these {len(train_x)} training images of {train_x[0].numel()} pixels has "
            f"{most} components (at most the number of pixels and of images); give sizes up "
            f"to {most}",
        )
    results, reconstructions = [], {}
    for k in latent_dims:
        error = squared_error(test_x, pca.reconstruct(test_x, k)).mean()
        results.append(Result("pca", k, float(error)))
        reconstructions["pca", k] = pca.reconstruct(shown, k)
        log.info("pca k=%d: test squared error %.4f", k, float(error))

    jobs = [
        (method, overrides, k) for method, overrides in cfg.methods.items() for k in latent_dims
    ]
    for number, (method, overrides, k) in enumerate(jobs, 1):
        run_dir = out_dir / RUNS_DIR / f"{method}_k{k}"
        run_cfg = run_config(cfg, list(overrides), k)
        place = f"job {number} of {len(jobs)}"
        log.info("%s: training %s with latent size %d -> %s", place, method, k, run_dir)
        start = time.perf_counter()
        with console_warnings_only():
            metrics = train(run_cfg, run_dir)
        log.info(
            "%s: %s k=%d: test squared error %.4f (%d epochs, %.0f s)",
            place,
            method,
            k,
            metrics["test/recon_mse"],
            metrics["epochs"],
            time.perf_counter() - start,
        )
        results.append(Result(method, k, metrics["test/recon_mse"]))
        model, _ = load_run(run_dir)
        with torch.no_grad():
            reconstructions[method, k] = model.reconstruct(shown, shown_labels)

    write_csv(results, out_dir / "comparison.csv")
    table = markdown_table(results)
    (out_dir / "comparison.md").write_text(table)
    title = f"{datamodule.name}: test error against latent size"
    error_plot = plot_error_vs_latent_dim(results, title)
    error_plot.savefig(out_dir / "error_vs_latent_dim.png", dpi=120)
    recon_plot = plot_reconstructions(shown, reconstructions)
    recon_plot.savefig(out_dir / "reconstructions.png", dpi=120)

    with SummaryWriter(str(out_dir / "tensorboard")) as writer:
        writer.add_text("comparison", table)
        for r in results:
            writer.add_scalar(f"compare_pca/{r.method}", r.test_recon_mse, r.latent_dim)
        writer.add_figure("compare_pca/error_vs_latent_dim", error_plot)
        writer.add_figure("compare_pca/reconstructions", recon_plot)
    print(table)
    print(f"written to {out_dir}")
    return results


@suggest_keys_on_failure(CONFIG_DIR, "compare_pca")
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="compare_pca")
def _main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    # The lock that choosing the directory took (the run_dir resolver, or main() for a
    # hydra.run.dir= of the command line): it knows what the directory held before.
    claim = lock.acquire(out_dir)
    try:
        compare(cfg, out_dir)
    except run_dirs.CONFIG_ERRORS as error:
        if (out_dir / RUNS_DIR).exists():
            raise  # refused while training a method: what the comparison did so far stays
        claim.discard(written=(HYDRA_DIR, f"{HydraConfig.get().job.name}.log"))
        run_dirs.config_error_exit(*run_dirs.config_error_message(error))
    finally:
        claim.release()


def main() -> None:
    """``python scripts/compare_pca.py`` / ``vae-compare-pca``: locks a ``hydra.run.dir=`` of the
    command line and refuses one that holds an earlier comparison (Hydra would overwrite its
    config) or the user's own files, then runs Hydra."""
    run_dirs.lock_command_line_dir(sys.argv[1:])
    run_dirs.refuse_existing_run_dir(sys.argv[1:], resumable=False)
    _main()
