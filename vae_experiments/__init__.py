"""vae-experiments: config-driven experiments with autoencoders and VAEs."""

from vae_experiments.runs import load_run, read_metrics

__all__ = ["load_run", "read_metrics"]
__version__ = "0.1.0"
