"""The run directory, and nothing else owns it: its layout (file names, status words, which
checkpoint), reading and writing its files, loading a run back, and the records that sweep
reports read. Plain torch and OmegaConf: importing it imports neither Lightning nor Hydra, and
torch only when a name that needs it is first used (:data:`_NEEDS_TORCH`), so that a command's
start-up (``--help``, a config mistake) stays fast."""

from __future__ import annotations

from vae_experiments.lazy_names import lazy_getattr
from vae_experiments.runs.files import (
    DiskFullError,
    after_earlier_event_files,
    atomic_write,
    load_config,
    read_command_overrides,
    read_group_choices,
    read_metrics,
    read_status,
    save_config,
    write_json_atomic,
    write_status,
)
from vae_experiments.runs.layout import (
    ANALYSIS_DIR,
    BEST,
    CHECKPOINT_CHOICES,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    DIED,
    EVALUATE_RECORD_PATTERN,
    EVENT_FILE_GLOB,
    FAILED,
    FINISHED,
    IMAGES_DIR,
    INCOMPLETE,
    INTERRUPTED,
    LAST,
    LOCK_FILE,
    METRICS_FILE,
    RUNNING,
    STATUS_FILE,
    checkpoint_path,
    find_checkpoint,
    holds_a_run,
    is_first_process,
    is_run_dir,
    newest_checkpoint,
    run_dir_of,
    tensorboard_dir,
)
from vae_experiments.runs.lock import RunLock, RunLocked
from vae_experiments.runs.records import RunRecord, collect_runs, evaluation_records, read_run

__all__ = [
    "read_command_overrides",
    "read_group_choices",
    "ANALYSIS_DIR",
    "BEST",
    "CHECKPOINT_CHOICES",
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "DIED",
    "EVALUATE_RECORD_PATTERN",
    "DiskFullError",
    "EVENT_FILE_GLOB",
    "FAILED",
    "FINISHED",
    "IMAGES_DIR",
    "INCOMPLETE",
    "INTERRUPTED",
    "LAST",
    "LOCK_FILE",
    "METRICS_FILE",
    "RUNNING",
    "STATUS_FILE",
    "RunLock",
    "RunLocked",
    "RunRecord",
    "after_earlier_event_files",
    "atomic_write",
    "build_model",
    "checkpoint_path",
    "collect_runs",
    "evaluation_records",
    "find_checkpoint",
    "holds_a_run",
    "is_first_process",
    "is_run_dir",
    "iterate_split",
    "load_config",
    "load_data",
    "load_run",
    "load_split",
    "newest_checkpoint",
    "read_metrics",
    "read_run",
    "read_status",
    "run_dir_of",
    "save_config",
    "tensorboard_dir",
    "write_json_atomic",
    "write_status",
]

#: Names that import torch (and the data sources) when first used: name -> its module.
_NEEDS_TORCH = {
    "iterate_split": "vae_experiments.data",
    "load_split": "vae_experiments.data",
    "build_model": "vae_experiments.runs.load",
    "load_data": "vae_experiments.runs.load",
    "load_run": "vae_experiments.runs.load",
}

__getattr__ = lazy_getattr(__name__, _NEEDS_TORCH)
