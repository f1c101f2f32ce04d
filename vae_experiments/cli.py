"""Command-line entry points (Hydra)."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vae_experiments.commands.did_you_mean import suggest_keys_on_failure

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def _is_first_process() -> bool:
    """False in the extra processes of a distributed run (they must not write run files)."""
    ranks = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return all(int(os.environ.get(name, 0)) == 0 for name in ranks)


@suggest_keys_on_failure(CONFIG_DIR, "train")
@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    """``python train.py model=vae data=digits ...``: trains one model; returns its test loss
    (the value Hydra's sweepers minimise).

    ``<run dir>/status.json`` says how the run ended; in a sweep, a failed job is recorded there
    and the other jobs still run.
    """
    # Heavy imports after Hydra has parsed the arguments, so --help and --cfg stay fast.
    from vae_experiments.runs import CHECKPOINT_DIR, write_status
    from vae_experiments.training import train
    from vae_experiments.training.multirun_ddp import ddp_sweep_job

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    record = _is_first_process()
    if record:
        write_status(run_dir, "running", pid=os.getpid())
    try:
        with ddp_sweep_job(cfg.trainer):
            metrics = train(cfg, run_dir)
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C into sys.exit(1)
        if record:
            last = run_dir / CHECKPOINT_DIR / "last.ckpt"
            write_status(run_dir, "interrupted", resume_from=str(last) if last.is_file() else None)
        raise
    except Exception as error:
        if record:
            write_status(
                run_dir,
                "failed",
                error=f"{type(error).__name__}: {error}",
                traceback=traceback.format_exc(limit=-8),
            )
        raise
    if record:
        write_status(run_dir, "finished")
    return metrics["test/loss"]
