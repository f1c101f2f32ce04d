"""Fit a VQ-VAE's prior over code grids: ``python scripts/fit_prior.py run=<run dir>``."""

from vae_experiments.cli.fit_prior import main

if __name__ == "__main__":
    main()
