"""``hydra/sweeper=optuna`` (vae_experiments/configs/hydra/sweeper/optuna.yaml): Hydra builds
sweepers only from classes defined in the ``hydra_plugins`` package. The search itself is
:class:`vae_experiments.cli.search.OptunaSearch`."""

from hydra.plugins.sweeper import Sweeper

from vae_experiments.cli.search import OptunaSearch


class OptunaSweeper(OptunaSearch, Sweeper):
    """Searches hyperparameters with Optuna; see :mod:`vae_experiments.cli.search`."""
