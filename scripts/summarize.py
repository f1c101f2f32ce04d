"""Sweep reports: ``python scripts/summarize.py multirun/<date>/<time> --sort test/recon_mse``."""

import sys

from vae_experiments.cli.summarize import main

if __name__ == "__main__":
    sys.exit(main())
