"""Models: plain ``nn.Module``s with ``encode``, ``decode``, ``reconstruct``, ``sample`` and
``loss``, composed from a network body, a likelihood, (autoencoders) a corruption and (VQ-VAE) a
prior over code grids. The configs in ``configs/model/`` name these classes with nested
``_target_``s."""

from vae_experiments.models import networks
from vae_experiments.models.autoencoder import Autoencoder
from vae_experiments.models.base import LatentModel
from vae_experiments.models.corruption import GaussianNoise, Masking
from vae_experiments.models.cvae import CVAE
from vae_experiments.models.disentangling import BetaTCVAE, CapacityVAE, FactorVAE
from vae_experiments.models.likelihoods import Bernoulli, Gaussian, Likelihood, SquaredError
from vae_experiments.models.networks import (
    MLP,
    Conv,
    ConvDecoder,
    ConvEncoder,
    Linear,
    MLPDecoder,
    MLPEncoder,
    Network,
)
from vae_experiments.models.vae import VAE, HierarchicalVAE, gaussian_kl, iwae_bound
from vae_experiments.models.vqvae import VQVAE

__all__ = [
    "CVAE",
    "BetaTCVAE",
    "CapacityVAE",
    "FactorVAE",
    "MLP",
    "VAE",
    "VQVAE",
    "Autoencoder",
    "Bernoulli",
    "Conv",
    "ConvDecoder",
    "ConvEncoder",
    "Gaussian",
    "HierarchicalVAE",
    "GaussianNoise",
    "LatentModel",
    "Likelihood",
    "Linear",
    "MLPDecoder",
    "MLPEncoder",
    "Masking",
    "Network",
    "SquaredError",
    "gaussian_kl",
    "iwae_bound",
    "networks",
]
