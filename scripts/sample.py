"""Sample from a trained model's latent space: ``python scripts/sample.py run=<run dir> density=gmm``."""

from vae_experiments.cli.sample import main

if __name__ == "__main__":
    main()
