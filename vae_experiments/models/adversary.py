"""Models with an adversary: a second network trained by a second optimizer on a second loss.

A model with an adversary (FactorVAE's discriminator on codes, later an adversarial autoencoder's
discriminator on codes or a VAE-GAN's discriminator on images) is still one ``nn.Module`` with one
``loss``. It says three more things, and the training module
(:class:`~vae_experiments.training.module.LitModel`) steps it without a loop of its own:

- ``has_adversary = True`` (class attribute, read from the config's ``_target_`` before anything
  is built, so that the settings such a model cannot train with are refused early);
- :meth:`adversary_parameters`: the parameters the second optimizer trains; every other parameter
  is trained by the run's ``optimizer=`` on ``loss["loss"]``;
- ``adversary_optimizer``: a partial optimizer taking those parameters (the config's
  ``model.adversary_optimizer``), and the term :data:`ADVERSARY_LOSS` of ``loss``'s dict, which
  that optimizer minimises.

Both objectives come out of one ``loss`` call (one forward pass); the adversary's is computed on
detached inputs (codes, or generated images), so that its gradients reach only the adversary,
while ``loss`` may flow through the adversary into the model (the generator's side of the game).
Each step, the model's optimizer steps first on ``loss``, then the adversary's on
:data:`ADVERSARY_LOSS` (its gradients zeroed first, so the model's backward pass leaves nothing
in them). A VAE-GAN or an adversarial autoencoder fits the same shape: ``loss`` holds the
reconstruction and the generator's (or encoder's) adversarial term, :data:`ADVERSARY_LOSS` the
discriminator's binary cross-entropy on real versus generated (or prior versus encoded) inputs.

Plain torch: no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: The term of a model's ``loss`` that its adversary's optimizer minimises.
ADVERSARY_LOSS = "adversary_loss"

OptimizerFactory = Callable[..., torch.optim.Optimizer]


def has_adversary(model: nn.Module | type) -> bool:
    """Whether ``model`` (an instance or a class) trains an adversary with a second optimizer."""
    return bool(getattr(model, "has_adversary", False))


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The model's own parameters (trained on ``loss``) and its adversary's (trained on
    :data:`ADVERSARY_LOSS`), each in registration order (which the optimizers' saved states
    depend on); every parameter in exactly one of them."""
    adversary = list(model.adversary_parameters()) if has_adversary(model) else []
    ids = {id(parameter) for parameter in adversary}
    own = [parameter for parameter in model.parameters() if id(parameter) not in ids]
    return own, adversary
