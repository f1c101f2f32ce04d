"""Autoencoders against PCA: ``python scripts/compare_pca.py data=digits latent_dims=[2,8,16,32]``."""

from vae_experiments.cli.compare_pca import main

if __name__ == "__main__":
    main()
