"""What unit a metric is in, so that unlike units are never compared by default.

A loss term is in the unit of the run's likelihood: an autoencoder's ``SquaredError`` loss is a
squared error summed over pixels, a VAE's ``DiscretizedLogistic`` loss is nats of a probability
of 8-bit pixels, a ``Gaussian`` one nats of a density. Such terms of runs with different
likelihoods do not rank against each other, so TensorBoard's tags carry the unit
(``val/loss [squared_error]``: a chart per unit) and a sweep table sorts within each unit. The
other metrics (``kl``, ``recon_mse``, ``bpd``, ``active_units``, ...) mean the same in every
run.

Plain Python: training (TensorBoard's tags), the evaluation command and the sweep reports read it.
"""

from __future__ import annotations

import re

#: Terms in the unit of the run's likelihood: -log p(x|z) and the bounds and losses built on it.
LIKELIHOOD_TERMS = ("loss", "recon", "elbo", "iwae_bound", "log_px")
#: The config key that names a run's likelihood (its class).
LIKELIHOOD_KEY = "model.likelihood._target_"


def likelihood_unit(target: object) -> str:
    """The unit name of a likelihood ``_target_``, as its config option is named:
    ``vae_experiments.models.likelihoods.SquaredError`` -> ``squared_error``; ``""`` when the run
    names none (a run from before the key, or a test's fake)."""
    if not target:
        return ""
    name = str(target).rpartition(".")[2]
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def metric_unit(metric: str, unit: str) -> str:
    """The unit ``metric`` (``test/loss``, ``val/kl``) is in for a run whose likelihood's unit is
    ``unit``: that unit for a term of :data:`LIKELIHOOD_TERMS`, else ``""`` (one meaning in
    every run)."""
    return unit if metric.rpartition("/")[2] in LIKELIHOOD_TERMS else ""


def unit_tag(metric: str, unit: str) -> str:
    """``metric`` as TensorBoard's tag: ``val/loss [squared_error]`` for a term in the
    likelihood's unit (:func:`metric_unit`), else the name as it is."""
    unit = metric_unit(metric, unit)
    return f"{metric} [{unit}]" if unit else metric
