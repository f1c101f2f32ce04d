"""Train a model: ``python train.py model=vae data=digits`` (see README.md and configs/)."""

from vae_experiments.cli.train import main

if __name__ == "__main__":
    main()
