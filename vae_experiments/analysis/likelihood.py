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
    batches = iterate_split(load_data(cfg), "test")  # (images, labels): a CVAE needs the labels
    print(evaluate_vae(model, batches, k=5000, max_batch_elems=2**26))  # nats per image
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from vae_experiments.models import VAE, LatentModel
from vae_experiments.models.likelihoods import BINARY, CONTINUOUS, EIGHT_BIT, Likelihood

#: Latent noise elements (images x samples x latent dims) drawn per random draw. Fixed, so the
#: samples do not depend on how the work is chunked.
NOISE_BLOCK_ELEMS = 2**22

#: Burda et al.'s threshold on Cov_x(E_q[z_u | x]) for a latent unit to count as active.
ACTIVE_UNIT_THRESHOLD = 0.01


def check_vae(model: LatentModel) -> None:
    """Raises ``ValueError`` unless ``model`` has a prior and a posterior (a VAE)."""
    if getattr(model, "discrete_codes", False):
        raise ValueError(
            f"log-likelihood evaluation needs a VAE (a posterior q(z | x) to importance-sample), "
            f"got {type(model).__name__}: its prior over codes is measured in bits per code "
            "(test/prior_bits_per_code in metrics.json), by training and by scripts/fit_prior.py"
        )
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


def decoder_row_elems(model: VAE, num_pixels: int, like: Tensor, y: Tensor | None = None) -> int:
    """Elements per latent row of the largest tensor in a decoder call: the image size, or a
    wider layer's output (a hidden layer of 512 units on 8x8 digits, a conv decoder's first
    block), measured with one row of ``like``'s device and dtype (model in eval mode), and the
    label ``y`` (1,) for a conditional model."""
    sizes = [num_pixels]

    def record(module, inputs, output):
        if isinstance(output, Tensor):
            sizes.append(output[0].numel())

    leaves = [m for m in model.decoder.modules() if next(m.children(), None) is None]
    hooks = [m.register_forward_hook(record) for m in leaves]
    try:
        model.decoder(model.decoder_input(like.new_zeros(1, model.latent_dim), y))
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
    y: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per-image statistics of K importance samples for images x (B, C, H, W) (with labels y
    (B,): those of log p(x | y) for a conditional model).

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
        y = None if y is None else y.to(model.device)
        batch_size = x.shape[0]
        mu, logvar = model.posterior(x, y)  # (B, D) each
        row_elems = decoder_row_elems(model, x[0].numel(), like=mu, y=None if y is None else y[:1])

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
                        x[rows],
                        eps[rows, s : s + samples],
                        posterior=(mu[rows], logvar[rows]),
                        y=None if y is None else y[rows],
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
            "means": model.posterior_means(x, y),
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
    y: Tensor | None = None,
) -> Tensor:
    """The importance-weighted estimate of log p(x) with k samples from q(z | x), per image
    (of log p(x | y) with samples from q(z | x, y) for a conditional model and labels y).

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
        y: the images' labels (B,), needed by a conditional model (a CVAE), ignored by others.

    Returns:
        (B,) float64 estimates of log p(x) (log p(x | y)) in nats per image.
    """
    return _log_weight_stats(model, x, k, max_batch_elems, generator, y=y)["log_px"]


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


class ActiveUnits:
    """Counts active latent units (Burda et al. 2015, section 5.2): units whose posterior mean
    varies across the data, ``Cov_x(E_q[z_u | x]) > threshold``, the unbiased variance over the
    images added.

    Batches of posterior means are added as running float64 sums on their device (no host
    sync); :meth:`counts` reads them. Sums from several processes add up to those of all their
    images, so a DDP run sums :attr:`sums` over processes and passes the result to
    :meth:`counts`. (Raw sums of squares lose digits only when a mean is ~1e6 times the spread;
    posterior means are near the N(0, I) prior's scale.)

    Args:
        layer_dims: the units of each latent layer, image side first (``model.latent_dims``).
    """

    def __init__(self, layer_dims: Sequence[int]) -> None:
        self.layer_dims = [int(dim) for dim in layer_dims]
        #: (2 * D + 1,) float64 (float32 on MPS): sums of the means, of their squares, and the
        #: number of images; D is all layers' units together. None until a batch is added.
        self.sums: Tensor | None = None

    @staticmethod
    def _dtype(device: torch.device | str) -> torch.dtype:
        # float64 where the device has it (Apple's MPS has not).
        return torch.float32 if torch.device(device).type == "mps" else torch.float64

    def empty_sums(self, device: torch.device | str) -> Tensor:
        """Sums of no images: what a process without a batch contributes to a sum over all."""
        size = 2 * sum(self.layer_dims) + 1
        return torch.zeros(size, dtype=self._dtype(device), device=device)

    def add(self, means: Sequence[Tensor]) -> None:
        """Adds one batch: each latent layer's posterior means (B, D_l), image side first."""
        dims = [layer.shape[1] for layer in means]
        if dims != self.layer_dims:
            raise ValueError(f"posterior means of layers {dims}, expected {self.layer_dims}")
        dtype = self._dtype(means[0].device)
        flat = torch.cat([layer.detach().to(dtype) for layer in means], dim=1)  # (B, D)
        count = flat.new_full((1,), flat.shape[0])
        batch = torch.cat([flat.sum(0), flat.square().sum(0), count])
        self.sums = batch if self.sums is None else self.sums + batch

    def counts(
        self, sums: Tensor | None = None, threshold: float = ACTIVE_UNIT_THRESHOLD
    ) -> list[int]:
        """Active units per latent layer, from :attr:`sums` or the same sums over all processes
        (``sums``); a host sync.

        Raises:
            ValueError: fewer than two images were added.
        """
        sums = self.sums if sums is None else sums
        num_images = 0 if sums is None else int(sums[-1])
        if num_images < 2:
            raise ValueError(
                f"active units need the posterior means of >= 2 images, got {num_images}"
            )
        total = sum(self.layer_dims)
        mean = sums[:total] / num_images
        variance = (sums[total : 2 * total] - num_images * mean.square()) / (num_images - 1)
        active = (variance > threshold).tolist()
        counts, start = [], 0
        for dim in self.layer_dims:
            counts.append(sum(active[start : start + dim]))
            start += dim
        return counts


def count_active_units(means: Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Latent units whose posterior mean varies across the data: ``Cov_x(E_q[z_u | x]) > threshold``.

    Burda et al. 2015, section 5.2. ``means`` (N, D) are the posterior means of the N images of
    a split; the variance is the unbiased one over the N images (:class:`ActiveUnits`).
    """
    if means.ndim != 2 or means.shape[0] < 2:
        raise ValueError(
            f"active units need posterior means (N, D) of N >= 2 images, got {tuple(means.shape)}"
        )
    units = ActiveUnits([means.shape[1]])
    units.add([means])
    return units.counts(threshold=threshold)[0]


def observed_pixel_kind(x: Tensor) -> str:
    """What pixels a batch (B, C, H, W) holds: ``"binary"`` (all 0 or 1), ``"8-bit"`` (all
    k / 255 for integers k in 0..255) or ``"continuous"``. Two host syncs."""
    if bool(((x == 0) | (x == 1)).all()):
        return BINARY
    levels = x * 255
    on_grid = (levels - levels.round()).abs() < 1e-3
    if bool((on_grid & (x >= 0) & (x <= 1)).all()):
        return EIGHT_BIT
    return CONTINUOUS


#: What a log p(x) is, by :func:`describe_log_px`: a log-likelihood of the data (bits per
#: dimension mean what papers report), a log-density of real-valued pixels, or neither.
LIKELIHOOD, DENSITY, NOT_A_LIKELIHOOD = "likelihood", "density", "not a likelihood"

_KIND_WORDS = {BINARY: "binary", EIGHT_BIT: "8-bit (256-level)", CONTINUOUS: "continuous"}


def describe_log_px(likelihood: Likelihood, data_kind: str) -> tuple[str, str]:
    """What the log p(x) of a VAE with ``likelihood`` means on data of pixels ``data_kind``.

    Bits per dimension are those of the literature only for a likelihood of discrete pixels
    that the data's pixels are values of: Bernoulli on binary data, a likelihood over the 256
    levels (``DiscretizedLogistic``) on 8-bit or binary data.

    Args:
        likelihood: the model's likelihood (its ``support`` says what it is normalised over).
        data_kind: ``"binary"``, ``"8-bit"`` or ``"continuous"`` (:func:`observed_pixel_kind`).

    Returns:
        (:data:`LIKELIHOOD`, :data:`DENSITY` or :data:`NOT_A_LIKELIHOOD`, a one-line note).
    """
    name = type(likelihood).__name__
    pixels = _KIND_WORDS[data_kind]
    support = likelihood.support
    if support is None:
        return NOT_A_LIKELIHOOD, (
            f"not a likelihood: {name} is not normalised (log p(x) is off by a constant); "
            "no bits/dim"
        )
    if support == CONTINUOUS:
        return DENSITY, (
            f"a log-density: {name} is a density on real-valued pixels, not a probability of "
            f"the {pixels} pixels, comparable only with densities on the same pixel scale; no "
            "bits/dim (model/likelihood=discretized_logistic is a likelihood of 8-bit pixels)"
        )
    fits = data_kind == BINARY or (support == EIGHT_BIT and data_kind == EIGHT_BIT)
    if fits:
        return LIKELIHOOD, f"a log-likelihood of the {pixels} pixels ({name})"
    advice = (
        "binarise the data (data.binarize=dynamic) or train with model/likelihood=auto "
        "(discretized_logistic on 8-bit pixels)"
        if support == BINARY
        else "evaluate it on the 8-bit data it was made for"
    )
    return NOT_A_LIKELIHOOD, (
        f"not a likelihood of the data: the {name} likelihood on {pixels} pixels is no "
        f"log-probability of them; no bits/dim ({advice})"
    )


@torch.no_grad()
def evaluate_vae(
    model: VAE,
    batches: Iterable[Tensor],
    k: int,
    max_batch_elems: int,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Likelihood evaluation of a VAE over a whole split, on the model's device.

    The model is evaluated in eval mode (its mode restored afterwards). A model conditioned on
    labels (``model.needs_labels``, a CVAE) is evaluated on log p(x | y): every number below is
    conditioned on the images' labels, and ``conditional`` is True.

    Args:
        model: a VAE.
        batches: image batches (B, C, H, W) in [0, 1], or ``(images, labels)`` pairs (which a
            conditional model needs), e.g. from :func:`vae_experiments.runs.iterate_split`.
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
        - ``log_px_is``: ``"likelihood"``, ``"density"`` or ``"not a likelihood"`` (the model's
          likelihood on the pixels the batches held, :func:`describe_log_px`), and
          ``log_px_note``, a line saying why;
        - ``bpd``: bits per dimension of ``log_px`` (:func:`bits_per_dim`) where ``log_px`` is a
          likelihood of the data, else None;
        - ``active_units``: the number of latent units with Cov_x(E_q[z_u | x]) > 0.01 over the
          split (:func:`count_active_units`; NaN for a single image), all layers together;
        - ``active_units_per_layer``: the same per latent layer, image side first (a list);
        - ``num_images``;
        - ``conditional``: whether every number is conditioned on the labels (log p(x | y)).
    """
    check_vae(model)
    with _eval_mode(model):
        model_k = int(getattr(model, "k", 1))
        bound_ks = bound_sample_counts(k, model_k)
        sums = {"log_px": 0.0, "elbo": 0.0, "recon": 0.0, "kl": 0.0}
        bound_sums = dict.fromkeys(bound_ks, 0.0)
        units, num_images, num_dims, kinds = ActiveUnits(model.latent_dims), 0, None, set()
        needs_labels = bool(getattr(model, "needs_labels", False))
        for batch in batches:
            x, y = (batch[0], batch[1]) if isinstance(batch, tuple | list) else (batch, None)
            if needs_labels and y is None:
                raise ValueError(
                    f"{type(model).__name__} is evaluated on log p(x | y): give (images, labels) "
                    "batches, e.g. from iterate_split"
                )
            y = y if needs_labels else None
            stats = _log_weight_stats(model, x, k, max_batch_elems, generator, bound_ks, y)
            for j, bound in stats.get("bounds", {}).items():
                bound_sums[j] += float(bound.sum())
            sums["log_px"] += float(stats["log_px"].sum())
            sums["elbo"] += float(stats["mean_log_w"].sum())
            sums["recon"] -= float(stats["mean_log_px_z"].sum())
            sums["kl"] += float(stats["kl"].sum())
            units.add(stats["means"])
            kinds.add(observed_pixel_kind(x))
            num_images += x.shape[0]
            num_dims = x[0].numel()
    if num_images == 0:
        raise ValueError("evaluate_vae got no images: the batches were empty")
    results = {name: total / num_images for name, total in sums.items()}
    bounds = {j: total / num_images for j, total in bound_sums.items()}
    # The widest kind seen: one grey batch makes the data grey.
    data_kind = max(kinds, key=[BINARY, EIGHT_BIT, CONTINUOUS].index)
    log_px_is, note = describe_log_px(model.likelihood, data_kind)
    per_layer = units.counts() if num_images > 1 else [math.nan] * len(model.latent_dims)
    return {
        "log_px": results["log_px"],
        "log_px_k": k,
        "elbo": results["elbo"],
        "posterior_gap": results["log_px"] - results["elbo"],
        "bound_gap": results["log_px"] - bounds[model_k] if model_k in bounds else math.nan,
        "bounds": bounds,
        "recon": results["recon"],
        "kl": results["kl"],
        "log_px_is": log_px_is,
        "log_px_note": note,
        "bpd": bits_per_dim(results["log_px"], num_dims) if log_px_is == LIKELIHOOD else None,
        "active_units": sum(per_layer),
        "active_units_per_layer": per_layer,
        "num_images": num_images,
        "conditional": needs_labels,
    }
