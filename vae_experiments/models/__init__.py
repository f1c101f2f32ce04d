"""Models: plain ``nn.Module``s with ``encode``, ``decode``, ``reconstruct``, ``sample`` and
``loss``, composed from networks, likelihoods and corruptions."""

from vae_experiments.models.autoencoder import Autoencoder
from vae_experiments.models.base import LatentModel
from vae_experiments.models.corruption import GaussianNoise, Masking
from vae_experiments.models.factory import build_autoencoder, build_vae
from vae_experiments.models.likelihoods import Bernoulli, Gaussian, Likelihood, SquaredError
from vae_experiments.models.networks import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder
from vae_experiments.models.vae import VAE, gaussian_kl

__all__ = [
    "VAE",
    "Autoencoder",
    "Bernoulli",
    "ConvDecoder",
    "ConvEncoder",
    "Gaussian",
    "GaussianNoise",
    "LatentModel",
    "Likelihood",
    "MLPDecoder",
    "MLPEncoder",
    "Masking",
    "SquaredError",
    "build_autoencoder",
    "build_vae",
    "gaussian_kl",
]
