"""``python scripts/compare_pca.py``: autoencoders against PCA at several latent sizes.

Each call writes into a directory of its own: by default a new
``outputs/compare_pca/<date>/<time>/`` (``_1``, ``_2``, ... for calls started in the same second),
and a ``hydra.run.dir=`` that already holds a comparison is refused, so that no comparison
overwrites another's tables, pictures or trained runs.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf, open_dict

from vae_experiments.cli import run_dirs
from vae_experiments.cli.did_you_mean import suggest_keys_on_failure, unknown_key_messages
from vae_experiments.configs import CONFIG_DIR

log = logging.getLogger(__name__)
run_dirs.register_resolvers()  # ${fresh_dir:...} in configs/compare_pca.yaml


def run_config(cfg: DictConfig, overrides: list[str], latent_dim: int) -> DictConfig:
    """``train.yaml`` for one method at one latent size.

    The comparison's data, trainer and seed are shared by every method; the method's own
    overrides come last, so a method may change e.g. its optimizer or batch size.
    """
    overrides = [*overrides, f"model.latent_dim={latent_dim}"]
    try:
        run_cfg = hydra.compose(config_name="train", overrides=overrides)
    except ConfigCompositionException as error:
        hints = unknown_key_messages(CONFIG_DIR, "train", overrides)
        if not hints:
            raise
        raise ConfigCompositionException("\n".join([str(error), *hints])) from error
    with open_dict(run_cfg):
        for key in ("data", "trainer", "seed"):
            run_cfg[key] = cfg[key]
        run_cfg.logger = {"_target_": None}
        run_cfg.callbacks.image_grids.num_images = 0
        run_cfg.callbacks.latent_samples.enabled = False
    values = [o.lstrip("+") for o in overrides if "." in o.split("=", 1)[0]]
    return OmegaConf.merge(run_cfg, OmegaConf.from_dotlist(values))


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

    latent_dims = [int(k) for k in cfg.latent_dims]
    if not latent_dims or min(latent_dims) < 1:
        raise ValueError(f"latent_dims must be a non-empty list of sizes >= 1, got {latent_dims}")
    datamodule = load_data(cfg)
    train_x, _ = load_split(datamodule, "train")
    test_x, test_y = load_split(datamodule, "test")
    shown, shown_labels = test_x[: cfg.num_images], test_y[: cfg.num_images]

    pca = fit_pca(train_x)
    results, reconstructions = [], {}
    for k in latent_dims:
        error = squared_error(test_x, pca.reconstruct(test_x, k)).mean()
        results.append(Result("pca", k, float(error)))
        reconstructions["pca", k] = pca.reconstruct(shown, k)
        log.info("pca k=%d: test squared error %.4f", k, float(error))

    for method, overrides in cfg.methods.items():
        for k in latent_dims:
            run_dir = out_dir / "runs" / f"{method}_k{k}"
            run_cfg = run_config(cfg, list(overrides), k)
            log.info("training %s with latent size %d -> %s", method, k, run_dir)
            metrics = train(run_cfg, run_dir)
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
    compare(cfg, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    """``python scripts/compare_pca.py`` / ``vae-compare-pca``: refuses a ``hydra.run.dir=`` that
    holds an earlier comparison (Hydra would overwrite its config), then runs Hydra."""
    run_dirs.refuse_existing_run_dir(sys.argv[1:], resumable=False)
    _main()
