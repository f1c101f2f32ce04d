"""Likelihood evaluation of VAEs: the importance-weighted estimate of log p(x), bits per
dimension and active latent units.

The IWAE estimate (Burda et al. 2015, https://arxiv.org/abs/1509.00519) of an image x with K
samples z_k ~ q(z | x) is::

    log p(x) ~= log (1/K) sum_k w_k,    log w_k = log p(x | z_k) + log p(z_k) - log q(z_k | x)

It is a lower bound on log p(x) in expectation, increases with K and tends to log p(x) as K grows;
K = 1 is the single-sample ELBO, and the mean of the log-weights ``log w_k`` is an ELBO estimate
from the same samples.

Samples for many images go through the decoder at once. Memory stays bounded by chunking: no
tensor of a decoder call has more than ``max_batch_elems`` elements (images x samples x the larger
of the image size and the decoder's widest layer), and each image's log-sum-exp is accumulated
across chunks in float64. The noise is drawn in blocks
whose size depends only on the batch, K and the latent size, never on ``max_batch_elems``, so the
chunking changes the result by float rounding only.

Plain PyTorch, so it works in a notebook::

    from vae_experiments import load_run
    from vae_experiments.runs import iterate_split, load_data

    model, cfg = load_run("outputs/2026-11-25/14-03-12")
    batches = (x for x, _ in iterate_split(load_data(cfg), "test"))
    print(evaluate_vae(model, batches, k=5000, max_batch_elems=2**26))  # nats per image
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from vae_experiments.models import VAE, LatentModel

#: Latent noise elements (images x samples x latent dims) drawn per random draw. Fixed, so the
#: samples do not depend on how the work is chunked.
NOISE_BLOCK_ELEMS = 2**22

#: Burda et al.'s threshold on Cov_x(E_q[z_u | x]) for a latent unit to count as active.
ACTIVE_UNIT_THRESHOLD = 0.01


def check_vae(model: LatentModel) -> None:
    """Raises ``ValueError`` unless ``model`` has a prior and a posterior (a VAE)."""
    if not (getattr(model, "has_prior", False) and hasattr(model, "log_importance_weights")):
        raise ValueError(
            f"log-likelihood evaluation needs a VAE (a model with model.has_prior and a "
            f"posterior q(z | x)), got {type(model).__name__}; train one with model=vae"
        )


def _noise_blocks(
    batch_size: int, k: int, noise_dim: int, generator: torch.Generator | None, like: Tensor
) -> Iterator[Tensor]:
    """Standard normal noise (B, k_block, D) in blocks that together give k samples per image.

    Drawn on the generator's device (a CPU generator gives the same samples on any device) and
    moved to ``like``'s device and dtype.
    """
    device = generator.device if generator is not None else like.device
    block = max(1, min(k, NOISE_BLOCK_ELEMS // (batch_size * noise_dim)))
    for start in range(0, k, block):
        size = min(block, k - start)
        eps = torch.randn(batch_size, size, noise_dim, generator=generator, device=device)
        yield eps.to(like.device, like.dtype)


def decoder_row_elems(model: VAE, num_pixels: int, like: Tensor) -> int:
    """Elements per latent row of the largest tensor in a decoder call: the image size, or a
    wider layer's output (a hidden layer of 512 units on 8x8 digits, a conv decoder's first
    block), measured with one row of ``like``'s device and dtype (model in eval mode)."""
    sizes = [num_pixels]

    def record(module, inputs, output):
        if isinstance(output, Tensor):
            sizes.append(output[0].numel())

    leaves = [m for m in model.decoder.modules() if next(m.children(), None) is None]
    hooks = [m.register_forward_hook(record) for m in leaves]
    try:
        model.decoder(like.new_zeros(1, model.latent_dim))
    finally:
        for hook in hooks:
            hook.remove()
    return max(sizes)


def _chunk_sizes(
    batch_size: int, block: int, row_elems: int, max_batch_elems: int
) -> tuple[int, int]:
    """(images, samples) per decoder call with images x samples x row_elems <= max_batch_elems
    (or one image and one sample when even that is over the budget)."""
    if block * row_elems <= max_batch_elems:
        return max(1, min(batch_size, max_batch_elems // (block * row_elems))), block
    return 1, max(1, max_batch_elems // row_elems)


@contextmanager
def _eval_mode(model: LatentModel) -> Iterator[None]:
    """Evaluation mode (BatchNorm running statistics, no dropout) inside, the previous outside."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def _log_weight_stats(
    model: VAE,
    x: Tensor,
    k: int,
    max_batch_elems: int,
    generator: torch.Generator | None,
    bound_ks: Sequence[int] = (),
) -> dict[str, Tensor]:
    """Per-image statistics of K importance samples for images x (B, C, H, W).

    Returns float64 (B,) tensors ``log_px`` (the IWAE estimate), ``mean_log_w`` (mean log-weight,
    an ELBO estimate), ``mean_log_px_z`` (mean log p(x | z)) and ``kl`` (KL(q(z | x) || p(z)),
    :meth:`VAE.kl_estimate`), and ``means``, each latent layer's posterior means (B, D_l) in the
    model's dtype. With ``bound_ks``, also ``bounds``: j -> (B,) estimates of the j-sample bound
    L_j from the same K samples (:func:`bounds_from_log_weights`); this keeps all B x K
    log-weights (float64) in memory.
    """
    check_vae(model)
    if k < 1:
        raise ValueError(f"k (importance samples per image) must be >= 1, got {k}")
    if max_batch_elems < 1:
        raise ValueError(f"max_batch_elems must be >= 1, got {max_batch_elems}")
    with _eval_mode(model):
        x = x.to(model.device)
        batch_size = x.shape[0]
        mu, logvar = model.posterior(x)  # (B, D) each
        row_elems = decoder_row_elems(model, x[0].numel(), like=mu)

        lse = torch.full((batch_size,), -math.inf, dtype=torch.float64, device=x.device)
        sum_log_w = torch.zeros(batch_size, dtype=torch.float64, device=x.device)
        sum_log_px_z = torch.zeros_like(sum_log_w)
        all_log_w = lse.new_empty(batch_size, k if bound_ks else 0)
        offset = 0  # index of the block's first sample among the K
        for eps in _noise_blocks(batch_size, k, model.noise_dim, generator, mu):
            block = eps.shape[1]
            images, samples = _chunk_sizes(batch_size, block, row_elems, max_batch_elems)
            for i in range(0, batch_size, images):
                rows = slice(i, i + images)
                for s in range(0, block, samples):
                    log_w, log_px_z = model.log_importance_weights(  # (n, m) each
                        x[rows], eps[rows, s : s + samples], posterior=(mu[rows], logvar[rows])
                    )
                    lse[rows] = torch.logaddexp(lse[rows], torch.logsumexp(log_w, 1).double())
                    sum_log_w[rows] += log_w.double().sum(1)
                    sum_log_px_z[rows] += log_px_z.double().sum(1)
                    if bound_ks:
                        columns = slice(offset + s, offset + s + log_w.shape[1])
                        all_log_w[rows, columns] = log_w.double()
            offset += block
        mean_log_w, mean_log_px_z = sum_log_w / k, sum_log_px_z / k
        stats = {
            "log_px": lse - math.log(k),
            "mean_log_w": mean_log_w,
            "mean_log_px_z": mean_log_px_z,
            "kl": model.kl_estimate((mu, logvar), mean_log_px_z - mean_log_w).double(),
            "means": model.posterior_means(x),
        }
        if bound_ks:
            stats["bounds"] = bounds_from_log_weights(all_log_w, bound_ks)
        return stats


def bounds_from_log_weights(log_w: Tensor, bound_ks: Iterable[int]) -> dict[int, Tensor]:
    """Estimates of the j-sample bounds L_j = E[log (1/j) sum_i w_i] from K log-weights.

    The K samples are cut into floor(K / j) disjoint groups of j (the first ones; a remainder is
    left out), and each group's log-mean-exp is averaged: an unbiased estimate of L_j. j = 1 is
    the mean log-weight (the ELBO from the samples), j = K the IWAE estimate itself.

    Args:
        log_w: (B, K) log-weights of B images.
        bound_ks: the j, each between 1 and K.

    Returns:
        j -> (B,) estimates, in ``log_w``'s dtype.
    """
    batch_size, k = log_w.shape
    bounds = {}
    for j in bound_ks:
        if not 1 <= j <= k:
            raise ValueError(f"a bound's sample count must be in [1, {k}], got {j}")
        groups = log_w[:, : k // j * j].reshape(batch_size, k // j, j)
        bounds[j] = (torch.logsumexp(groups, 2) - math.log(j)).mean(1)
    return bounds


def bound_sample_counts(k: int, model_k: int = 1) -> list[int]:
    """The j whose bound L_j an evaluation with K = ``k`` samples reports: 1, 2, 5, 10, 20,
    50, ... below k, and the model's training ``model_k`` (below k)."""
    counts = {model_k} if model_k < k else set()
    j = 1
    while j < k:
        counts.update(c for c in (j, 2 * j, 5 * j) if c < k)
        j *= 10
    return sorted(counts)


def iwae_log_likelihood(
    model: VAE,
    x: Tensor,
    k: int,
    max_batch_elems: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The importance-weighted estimate of log p(x) with k samples from q(z | x), per image.

    Burda et al. 2015 (https://arxiv.org/abs/1509.00519), eq. 8:
    ``log (1/k) sum_k p(x | z_k) p(z_k) / q(z_k | x)`` with ``z_k ~ q(z | x)``, p(z) = N(0, I),
    log p(x | z) from ``model.likelihood`` summed over pixels (the weights are
    :meth:`VAE.log_importance_weights`). ``k=1`` gives a single-sample ELBO.

    Args:
        model: a VAE (anything with ``posterior``, ``decoder``, ``likelihood``); evaluated in
            eval mode, its mode restored afterwards.
        x: images (B, C, H, W), moved to the model's device.
        k: importance samples per image.
        max_batch_elems: the largest tensor of a decoder call has at most this many elements:
            images x samples x pixels, or x the widest decoder layer where that is wider than
            the image (:func:`decoder_row_elems`). Bounds memory (peak use is a few times this
            many floats); does not change the samples.
        generator: for reproducible samples; noise is drawn on its device.

    Returns:
        (B,) float64 estimates of log p(x) in nats per image.
    """
    return _log_weight_stats(model, x, k, max_batch_elems, generator)["log_px"]


def bits_per_dim(log_px: float, num_dims: int, bit_depth: int | None = None) -> float:
    """Bits per dimension of a log-likelihood ``log_px`` (nats per image of ``num_dims`` values).

    ``-log_px / (num_dims ln 2)`` for a discrete likelihood (Bernoulli). For a density on data
    scaled from ``bit_depth``-bit integers to [0, 1] (a Gaussian likelihood on 8-bit images),
    the density of an integer-valued image is ``p(x) / 2**(bit_depth * num_dims)``, which adds
    ``bit_depth`` bits per dimension: ``bpd = (-log_px / num_dims) / ln 2 + bit_depth``. (This is
    the usual convention for pixels scaled by 1/256; our data are scaled by 1/255, a difference
    of log2(256/255) = 0.006 bits.)
    """
    bpd = -log_px / (num_dims * math.log(2))
    return bpd + bit_depth if bit_depth is not None else bpd


def count_active_units(means: Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Latent units whose posterior mean varies across the data: ``Cov_x(E_q[z_u | x]) > threshold``.

    Burda et al. 2015, section 5.2. ``means`` (N, D) are the posterior means of the N images of
    a split; the variance is the unbiased one over the N images.
    """
    if means.ndim != 2 or means.shape[0] < 2:
        raise ValueError(
            f"active units need posterior means (N, D) of N >= 2 images, got {tuple(means.shape)}"
        )
    return int((means.double().var(0) > threshold).sum())


@torch.no_grad()
def evaluate_vae(
    model: VAE,
    batches: Iterable[Tensor],
    k: int,
    max_batch_elems: int,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Likelihood evaluation of a VAE over a whole split, on the model's device.

    The model is evaluated in eval mode (its mode restored afterwards).

    Args:
        model: a VAE.
        batches: image batches (B, C, H, W) in [0, 1] (``(images, labels)`` pairs also work),
            e.g. from :func:`vae_experiments.runs.iterate_split`.
        k: importance samples per image.
        max_batch_elems: memory bound of :func:`iwae_log_likelihood`.
        generator: for reproducible samples.

    Returns:
        Means over the images, in nats per image unless said otherwise:

        - ``log_px``: the IWAE estimate of log p(x) with ``k`` samples;
        - ``log_px_k``: ``k``;
        - ``elbo``: the mean log-weight over the same samples (an ELBO estimate with k samples,
          so lower variance than the single-sample ELBO of training);
        - ``posterior_gap``: ``log_px - elbo``, an estimate of the posterior gap
          E_x KL(q(z | x) || p(z | x)) = log p(x) - ELBO (from below, as ``log_px`` is);
        - ``bounds``: j -> L_j, the j-sample bound from the same samples
          (:func:`bounds_from_log_weights`), for j in :func:`bound_sample_counts` (1 is
          ``elbo``); log_px - L_j shrinks towards 0 as j grows;
        - ``bound_gap``: ``log_px - L_j`` for the model's own training bound, j = ``model.k``
          (the posterior gap for a VAE trained on the ELBO); NaN when ``model.k >= k``;
        - ``recon``: the mean of -log p(x | z) over the samples;
        - ``kl``: KL(q(z | x) || p(z)), analytic;
        - ``bpd``: bits per dimension of ``log_px`` (:func:`bits_per_dim`; a likelihood that is a
          continuous density (``continuous_density``, e.g. Gaussian) is read as a density on
          8-bit data scaled to [0, 1] and gets the 8-bit discretisation term,
          ``bpd = (-log_px / D) / ln 2 + 8``; a Bernoulli likelihood none);
        - ``active_units``: the number of latent units with Cov_x(E_q[z_u | x]) > 0.01 over the
          split (:func:`count_active_units`; NaN for a single image), all layers together;
        - ``active_units_per_layer``: the same per latent layer, image side first (a list);
        - ``num_images``.
    """
    check_vae(model)
    with _eval_mode(model):
        model_k = int(getattr(model, "k", 1))
        bound_ks = bound_sample_counts(k, model_k)
        sums = {"log_px": 0.0, "elbo": 0.0, "recon": 0.0, "kl": 0.0}
        bound_sums = dict.fromkeys(bound_ks, 0.0)
        means, num_images, num_dims = [[] for _ in model.latent_dims], 0, None
        for batch in batches:
            x = batch[0] if isinstance(batch, tuple | list) else batch
            stats = _log_weight_stats(model, x, k, max_batch_elems, generator, bound_ks)
            for j, bound in stats.get("bounds", {}).items():
                bound_sums[j] += float(bound.sum())
            sums["log_px"] += float(stats["log_px"].sum())
            sums["elbo"] += float(stats["mean_log_w"].sum())
            sums["recon"] -= float(stats["mean_log_px_z"].sum())
            sums["kl"] += float(stats["kl"].sum())
            for layer, layer_means in zip(means, stats["means"], strict=True):
                layer.append(layer_means.double().cpu())
            num_images += x.shape[0]
            num_dims = x[0].numel()
    if num_images == 0:
        raise ValueError("evaluate_vae got no images: the batches were empty")
    results = {name: total / num_images for name, total in sums.items()}
    bounds = {j: total / num_images for j, total in bound_sums.items()}
    bit_depth = 8 if model.likelihood.continuous_density else None
    per_layer = [
        count_active_units(torch.cat(layer)) if num_images > 1 else math.nan for layer in means
    ]
    return {
        "log_px": results["log_px"],
        "log_px_k": k,
        "elbo": results["elbo"],
        "posterior_gap": results["log_px"] - results["elbo"],
        "bound_gap": results["log_px"] - bounds[model_k] if model_k in bounds else math.nan,
        "bounds": bounds,
        "recon": results["recon"],
        "kl": results["kl"],
        "bpd": bits_per_dim(results["log_px"], num_dims, bit_depth),
        "active_units": sum(per_layer),
        "active_units_per_layer": per_layer,
        "num_images": num_images,
    }
