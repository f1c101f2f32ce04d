"""How good a generative model's samples are: a Fréchet distance and precision/recall in the
features of a classifier of the dataset.

Every model that generates is a :class:`Sampler`: ``sample(n, generator=None)`` returns images
(n, C, H, W) in [0, 1]. VAEs (IWAE, the two-layer VAE) draw from their prior with
``model.sample``; an autoencoder has no prior, and is sampled through a density fitted to its
codes (:class:`~vae_experiments.analysis.latent.DecodedDensity`). Any future model with
``sample(n, generator=None)`` plugs in as it is.

The numbers compare the features (:class:`~vae_experiments.analysis.classifier.
FeatureClassifier`, trained on the dataset's training split) of ``n`` samples with those of
``n`` held-out images:

- :func:`frechet_distance`: the Fréchet (2-Wasserstein) distance between Gaussians fitted to
  the two feature sets, ``|mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2))`` (Heusel et al.
  2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium").
  With Inception-v3's ImageNet features it is the FID papers report; with a small classifier's
  features it is not that number, and it depends on ``n`` (it is biased upwards at small ``n``),
  so compare models only at the same ``n`` on the same dataset.
- :func:`precision_recall`: Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
  Assessing Generative Models" (https://arxiv.org/abs/1904.06991): precision is the share of
  samples inside the real images' manifold (the union of balls around each real feature
  reaching its k-th nearest real neighbour), recall the share of real images inside the
  samples' manifold. Precision says whether samples look like data; recall whether the samples
  cover all of it.

Plain PyTorch::

    real = features(classifier, test_batches)          # (N, F)
    fake = sample_features(classifier, model, n=N)     # (N, F)
    print(frechet_distance(real, fake), precision_recall(real, fake, k=3))
"""

from __future__ import annotations

import importlib.util
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

#: Rows of the distance matrix computed at once in :func:`precision_recall` (a chunk holds
#: chunk x N distances).
DISTANCE_CHUNK = 1024
#: The file torch-fidelity's Inception-v3 (the one FID papers use) loads its weights from.
INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"


class Sampler(Protocol):
    """Anything that generates images: ``sample(n, generator=None)`` -> (n, C, H, W) in [0, 1],
    on any device."""

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor: ...


def gaussian_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (F,) and covariance (F, F) of features (N, F), float64, the covariance with N - 1."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, F), got {tuple(features.shape)}")
    x = features.detach().double()
    mean = x.mean(0)
    centred = x - mean
    return mean, centred.T @ centred / (x.shape[0] - 1)


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (F, F)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance_of_gaussians(
    mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor
) -> float:
    """``|m1 - m2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2))`` for means (F,) and covariances (F, F).

    tr((C1 C2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the
    symmetric C1^(1/2) C2 C1^(1/2) (the same eigenvalues as C1 C2), in float64: no complex
    round-off as with a general matrix square root.
    """
    mean1, cov1, mean2, cov2 = (t.detach().double().cpu() for t in (mean1, cov1, mean2, cov2))
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    distance = (mean1 - mean2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_root
    return float(distance.clamp_min(0))


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets (N, F) and (M, F)."""
    return frechet_distance_of_gaussians(*gaussian_statistics(real), *gaussian_statistics(fake))


def kth_neighbour_radii(features: Tensor, k: int) -> Tensor:
    """Distance (N,) from each of features (N, F) to its k-th nearest other point of the set."""
    if not 1 <= k < features.shape[0]:
        raise ValueError(f"k must be from 1 to N - 1 = {features.shape[0] - 1}, got k={k}")
    radii = []
    for chunk in features.split(DISTANCE_CHUNK):
        distances = torch.cdist(chunk, features)  # (chunk, N), each point's own 0 among them
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _share_inside(points: Tensor, centres: Tensor, radii: Tensor) -> float:
    """Share of points (M, F) within radii[i] of some centres[i] (N, F)."""
    inside = []
    for chunk in points.split(DISTANCE_CHUNK):
        inside.append((torch.cdist(chunk, centres) <= radii).any(1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al.'s (2019) precision and recall of samples' features (M, F) against
    real features (N, F), with k-nearest-neighbour balls (float64 distances).

    Returns:
        (precision, recall), each in [0, 1].
    """
    real, fake = real.detach().double(), fake.detach().double()
    precision = _share_inside(fake, real, kth_neighbour_radii(real, k))
    recall = _share_inside(real, fake, kth_neighbour_radii(fake, k))
    return precision, recall


@torch.no_grad()
def features(classifier: nn.Module, batches: Iterable[Tensor]) -> Tensor:
    """``classifier.features`` of every image batch (B, C, H, W) in [0, 1]: (N, F) float64 on
    the CPU. Batches are moved to the classifier's device."""
    device = next(classifier.parameters()).device
    out = [classifier.features(x.to(device)).double().cpu() for x in batches]
    return torch.cat(out)


def sample_batches(
    sampler: Sampler, n: int, batch_size: int, generator: torch.Generator | None = None
) -> Iterable[Tensor]:
    """n samples in batches of ``batch_size``, clamped to [0, 1] (a Gaussian or squared-error
    decoder's mean can leave it slightly).

    Raises:
        ValueError: a batch has the wrong rank or a value that is NaN or infinite.
    """
    for start in range(0, n, batch_size):
        with torch.no_grad():
            x = sampler.sample(min(batch_size, n - start), generator=generator)
        if x.ndim != 4:
            raise ValueError(f"samples must be images (n, C, H, W), got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("the model's samples contain NaN or inf: is the checkpoint broken?")
        yield x.float().clamp(0, 1)


def sample_quality(real: Tensor, fake: Tensor, k: int = 3) -> dict[str, float]:
    """``fd_classifier``, ``precision`` and ``recall`` of sample features (M, F) against real
    features (N, F)."""
    precision, recall = precision_recall(real, fake, k)
    return {"fd_classifier": frechet_distance(real, fake), "precision": precision, "recall": recall}


def check_inception(weights: str | Path) -> Path:
    """Checks what the Inception FID needs, before any long work: torch-fidelity importable and
    the weights file present (never downloaded), a state dict of tensors that loads with
    ``weights_only=True``.

    Raises:
        ValueError: naming what to install or where to put the file.
    """
    path = Path(weights).expanduser()
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ValueError(
            "quality.inception_weights needs torch-fidelity (torchmetrics' FID runs its "
            "Inception-v3): pip install torch-fidelity, or pip install 'vae-experiments[fid]'"
        )
    if not path.is_file():
        raise ValueError(
            f"quality.inception_weights={weights}: no such file; put torch-fidelity's "
            f"{INCEPTION_WEIGHTS_NAME} (the Inception-v3 weights FID papers use, from "
            "torch-fidelity's GitHub releases) there. Nothing is downloaded"
        )
    # torch-fidelity unpickles the file with weights_only=False: let it see only a file that
    # loads as plain tensors with weights_only=True, so no code in it can run.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError("it holds more than a dict of tensors")
    except pickle.UnpicklingError:
        raise ValueError(
            f"quality.inception_weights={weights} holds Python objects besides tensors, which "
            f"are not loaded; use torch-fidelity's {INCEPTION_WEIGHTS_NAME}"
        ) from None
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"quality.inception_weights={weights} is no plain state dict of tensors that loads "
            f"with weights_only=True ({reason}); use torch-fidelity's {INCEPTION_WEIGHTS_NAME}"
        ) from None
    return path


def inception_fid(
    real_batches: Iterable[Tensor],
    fake_batches: Iterable[Tensor],
    weights: str | Path,
    device: str | torch.device = "cpu",
) -> float:
    """The FID papers report: torchmetrics' Inception-v3 FID (2048 features) with the weights in
    ``weights`` (:func:`check_inception`), of image batches (B, C, H, W) in [0, 1]; grey images
    are repeated to three channels, and the network resizes them to 299x299."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    path = check_inception(weights)
    metric = FrechetInceptionDistance(
        feature=2048, normalize=True, feature_extractor_weights_path=str(path)
    ).to(device)
    for batches, real in ((real_batches, True), (fake_batches, False)):
        for x in batches:
            x = x.to(device)
            metric.update(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x, real=real)
    return float(metric.compute())


def measure_samples(
    sampler: Sampler,
    classifier: nn.Module,
    real: Tensor,
    n: int,
    k: int = 3,
    batch_size: int = 500,
    generator: torch.Generator | None = None,
    reference: Tensor | None = None,
    inception_weights: str | Path | None = None,
) -> dict[str, float | int | None]:
    """Draws ``n`` samples and compares them with held-out images in the classifier's features.

    Args:
        sampler: the generator (:class:`Sampler`).
        classifier: has ``features(x)``, images (B, C, H, W) in [0, 1] -> (B, F).
        real: held-out images (N, C, H, W) in [0, 1] (the test split's first N), any device.
        n: samples drawn (N is usually the same).
        k: nearest neighbours of :func:`precision_recall`.
        batch_size: samples per ``sampler.sample`` call, and images per feature batch.
        generator: seeds the samples.
        reference: optional real images not in ``real`` (the training split's first N): the
            same numbers for them are what a perfect generator scores at this count (the
            Fréchet distance is not 0 there: it is biased upwards at any finite N).
        inception_weights: also the Inception FID (:func:`inception_fid`) with these weights.

    Returns:
        ``fd_classifier``, ``precision``, ``recall``, ``num_samples``, ``num_real``,
        ``reference_fd_classifier``, ``reference_precision``, ``reference_recall`` (None without
        ``reference``) and ``fid_inception`` (None without ``inception_weights``).
    """
    real_features = features(classifier, real.split(batch_size))
    kept: list[Tensor] = []  # the samples, only for the Inception network

    def batches() -> Iterable[Tensor]:
        for x in sample_batches(sampler, n, batch_size, generator):
            if inception_weights is not None:
                kept.append(x.cpu())
            yield x

    result: dict[str, float | int | None] = {
        **sample_quality(real_features, features(classifier, batches()), k),
        "num_samples": n,
        "num_real": len(real),
    }
    for key in ("fd_classifier", "precision", "recall"):
        result[f"reference_{key}"] = None
    if reference is not None:
        baseline = sample_quality(
            real_features, features(classifier, reference.split(batch_size)), k
        )
        result.update({f"reference_{key}": value for key, value in baseline.items()})
    result["fid_inception"] = None
    if inception_weights is not None:
        device = next(classifier.parameters()).device
        result["fid_inception"] = inception_fid(
            real.split(batch_size), kept, inception_weights, device
        )
    return result
