"""The run directory's layout: every file name, status word and checkpoint rule, in one place.

A run directory (``outputs/<date>/<time>/`` or ``multirun/<date>/<time>/<job>/``) holds::

    config.yaml               the composed config with the data's image shape in
                              ``model.image_shape``: what load_run and resume= rebuild from
    .hydra/                   Hydra's records of the command line (overrides, group choices)
    checkpoints/best.ckpt     lowest validation loss
    checkpoints/last.ckpt     end of the last epoch, or where an interruption stopped
    hpc_ckpt_<n>.ckpt         Lightning's SLURM requeue checkpoint (under SLURM only)
    metrics.json              test-split metrics at the end of training, plus epochs/steps/time
    status.json               how the run stands: running, finished, failed or interrupted
    lock.json                 while a command writes the run: its pid, host, start and command
                              (runs/lock.py); left behind only by a killed process
    train.log                 the log of every command that wrote the run (Hydra's job log)
    events.out.tfevents.*     TensorBoard's event files, in the run directory itself so that
                              TensorBoard names the run after it (``tensorboard/`` in runs
                              made before: they keep it, :func:`tensorboard_dir`)
    csv/, wandb/              the other loggers' files
    images/                   reconstruction and sample grids as PNG
    prior.pt                  VQ-VAE: its second stage, the prior over code grids fitted to a
                              checkpoint's codes (its recipe, weights, that checkpoint's step, bits
                              per code), written at the end of training and by fit_prior.py;
                              load_run attaches it (runs/priors.py)
    prior.earlier-<n>.pt      a prior.pt that a later fit replaced, kept
    analysis/<call>/          a folder per call of an analysis command (evaluate, sample), named
                              after what made it (``evaluate-best-test-k5000``); never reused

Plain Python: no torch, Lightning or Hydra.
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_FILE = "config.yaml"
HYDRA_DIR = ".hydra"
HYDRA_CONFIG_FILE = f"{HYDRA_DIR}/config.yaml"
HYDRA_OVERRIDES_FILE = f"{HYDRA_DIR}/overrides.yaml"
HYDRA_CHOICES_FILE = f"{HYDRA_DIR}/hydra.yaml"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.json"
STATUS_FILE = "status.json"
LOCK_FILE = "lock.json"
LOG_FILE = "train.log"  # Hydra's job log, named after hydra.job.name in configs/train.yaml
#: What Hydra writes in a sweep's own directory (beside the job directories).
SWEEP_CONFIG_FILE = "multirun.yaml"
SEARCH_FILE = "search.yaml"  # a search's trials and best one, in its sweep dir (cli/search.py)
IMAGES_DIR = "images"
PRIOR_FILE = "prior.pt"  # a VQ-VAE's prior over code grids (runs/priors.py)
#: A replaced prior.pt, kept: ``prior.earlier-<n>.pt`` (n from 1).
EARLIER_PRIOR_PATTERN = "prior.earlier-{}.pt"
ANALYSIS_DIR = "analysis"
#: scripts/evaluate.py's record of one call, in its folder under analysis/: ``evaluate_<split>.json``.
EVALUATE_RECORD_PATTERN = "evaluate_{}.json"
#: TensorBoard's event files (``events.out.tfevents.<second>.<host>.<pid>.<n>``).
EVENT_FILE_GLOB = "events.out.tfevents.*"
#: Where runs made before the events moved into the run directory itself kept them.
OLD_TENSORBOARD_DIR = "tensorboard"

#: Terms of ``metrics.json`` (after their ``val/`` or ``test/``) that are better higher, and those
#: better lower: what a search maximises or minimises (:func:`metric_direction`).
HIGHER_IS_BETTER = ("elbo", "iwae_bound", "log_px", "active_units")
LOWER_IS_BETTER = ("loss", "recon", "kl", "recon_mse", "bpd", "posterior_gap", "bound_gap")


def metric_direction(metric: str) -> str | None:
    """``maximize`` for a metric that is better higher (``val/elbo``), ``minimize`` for one that
    is better lower (``val/loss``), None for a name not listed above."""
    term = metric.rpartition("/")[2]
    if term in HIGHER_IS_BETTER:
        return "maximize"
    return "minimize" if term in LOWER_IS_BETTER else None


#: Checkpoint names in ``checkpoints/``: ``best`` (lowest validation loss) and ``last``.
BEST, LAST = "best", "last"
CHECKPOINT_CHOICES = (BEST, LAST)
#: Lightning's SLURM requeue checkpoints, beside the run's folders.
HPC_CHECKPOINT_GLOB = "hpc_ckpt_*.ckpt"

#: The words of ``status.json``'s ``status``.
RUNNING, FINISHED, FAILED, INTERRUPTED = "running", "finished", "failed", "interrupted"
#: A run with neither status.json nor metrics.json: crashed early, killed, or still starting.
INCOMPLETE = "incomplete"
#: A run whose status.json says running while no process holds its lock (killed, power loss).
DIED = "died"

#: Files that mark a directory as holding a run (ours, or one Hydra started).
RUN_MARKERS = (CONFIG_FILE, HYDRA_CONFIG_FILE, STATUS_FILE, CHECKPOINT_DIR)


def checkpoint_path(run_dir: str | Path, which: str) -> Path:
    """``<run_dir>/checkpoints/<which>.ckpt`` (which is ``best`` or ``last``)."""
    if which not in CHECKPOINT_CHOICES:
        raise ValueError(f"checkpoint must be best or last, got checkpoint={which}")
    return Path(run_dir) / CHECKPOINT_DIR / f"{which}.ckpt"


def tensorboard_dir(run_dir: str | Path) -> Path:
    """The folder of the run's TensorBoard event files: the run directory itself, whose path
    TensorBoard shows as the run's name; ``<run_dir>/tensorboard`` for a run that already has
    its events there (made before), so that a resumed or evaluated old run stays one run."""
    run_dir = Path(run_dir)
    old = run_dir / OLD_TENSORBOARD_DIR
    return old if any(old.glob(EVENT_FILE_GLOB)) else run_dir


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a run's config (ours or Hydra's)."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() or (path / HYDRA_CONFIG_FILE).is_file()


def holds_a_run(directory: str | Path) -> bool:
    """Whether ``directory`` has a run's config, status or checkpoints in it."""
    return any((Path(directory) / marker).exists() for marker in RUN_MARKERS)


def run_dir_of(run: str | Path | None, key: str = "run") -> Path:
    """The run directory of ``run``: a run directory, or a checkpoint in one (in its
    ``checkpoints/`` folder, or Lightning's SLURM ``hpc_ckpt_<n>.ckpt`` beside it).

    Args:
        run: what the command line gave.
        key: the command-line key it came from, for the messages (``run``, ``resume``).

    Raises:
        ValueError: if ``run`` is missing (None, empty).
        FileNotFoundError: if it is no run directory.
    """
    if run is None or str(run) in ("", "???"):
        raise ValueError(
            f"no run given: the command needs {key}=<run directory or checkpoint> (one run per "
            "command: -m can sweep other settings, loop in the shell over several runs)"
        )
    path = Path(str(run)).expanduser()
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise FileNotFoundError(f"{key}={run}: no such checkpoint file")
        for run_dir in (path.parent.parent, path.parent):
            if is_run_dir(run_dir):
                return run_dir
        raise FileNotFoundError(f"{key}={run}: the checkpoint is not inside a run directory")
    if not is_run_dir(path):
        what = "does not exist" if not path.exists() else f"has no {CONFIG_FILE}"
        raise FileNotFoundError(
            f"{key}={run}: {path} is not a run directory: it {what}; pass the run directory "
            "that train.py printed (outputs/<date>/<time>), or a .ckpt file in its "
            "checkpoints/ folder"
        )
    return path


def find_checkpoint(run: str | Path, which: str = BEST, key: str = "run") -> Path:
    """The checkpoint that ``run`` names: the file itself for a ``.ckpt``, else the run
    directory's ``<which>.ckpt``, falling back to the other of best/last if it is missing.

    Raises:
        FileNotFoundError: naming ``key`` when there is no such checkpoint.
    """
    path = Path(str(run)).expanduser()
    if path.suffix == ".ckpt":
        if not path.is_file():
            raise FileNotFoundError(f"{key}={run}: no such checkpoint file")
        return path
    order = [which, *(c for c in CHECKPOINT_CHOICES if c != which)]
    for name in order:
        candidate = checkpoint_path(path, name)
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no checkpoint in {path / CHECKPOINT_DIR} (looked for best.ckpt and last.ckpt); is "
        f"{path} a run directory of a run that finished at least one epoch?"
    )


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """The most recently written of ``checkpoints/last.ckpt`` (epoch ends and interruptions)
    and Lightning's SLURM ``hpc_ckpt_<n>.ckpt``: where a resumed run continues; None if the run
    has neither."""
    run_dir = Path(run_dir)
    candidates = [checkpoint_path(run_dir, LAST), *run_dir.glob(HPC_CHECKPOINT_GLOB)]
    existing = [path for path in candidates if path.is_file()]
    return max(existing, key=lambda path: path.stat().st_mtime) if existing else None


def is_first_process() -> bool:
    """False in the extra processes of a distributed run: they share the first one's run
    directory and must not write its files."""
    ranks = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return all(int(os.environ.get(name, 0)) == 0 for name in ranks)
