"""Likelihood evaluation of a trained VAE: ``python scripts/evaluate.py run=<run dir>``
(see configs/evaluate.yaml)."""

from vae_experiments.cli.evaluate import main

if __name__ == "__main__":
    main()
