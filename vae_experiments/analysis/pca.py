"""PCA in closed form, the optimum that a linear autoencoder can only match.

Eckart-Young: among all rank-k linear reconstructions, projecting the centred data onto its top-k
principal directions has the least squared error; a linear autoencoder trained on squared error
reaches that error, and its decoder spans the same subspace (Baldi & Hornik 1989).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PCA:
    """Principal directions of a data set.

    Attributes:
        mean: data mean, flattened (D,).
        components: principal directions as orthonormal rows (K, D), by decreasing variance.
        variances: variance along each direction (K,).
        image_shape: shape of one image, to un-flatten reconstructions.
    """

    mean: torch.Tensor
    components: torch.Tensor
    variances: torch.Tensor
    image_shape: tuple[int, ...]

    def encode(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Coordinates of images (B, C, H, W) in the top-k directions: (B, k)."""
        self._check_k(k)
        centred = x.flatten(1).to(self.mean) - self.mean
        return centred @ self.components[:k].T

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) from coordinates (B, k)."""
        k = codes.shape[1]
        flat = codes @ self.components[:k] + self.mean  # (B, D)
        return flat.view(-1, *self.image_shape)

    def reconstruct(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Projection of images (B, C, H, W) onto the top-k principal subspace, same shape."""
        return self.decode(self.encode(x, k)).to(x.dtype)

    def _check_k(self, k: int) -> None:
        if not 1 <= k <= self.components.shape[0]:
            raise ValueError(
                f"k={k} principal components asked for, but PCA has {self.components.shape[0]} "
                "(at most the number of pixels and of training images)"
            )


def fit_pca(x: torch.Tensor) -> PCA:
    """Exact PCA of images (N, C, H, W) by an SVD of the centred data, in float64.

    Uses the whole array, no sampling or iterative solver; memory is about three copies of the
    data in float64 (55,000 Fashion-MNIST images: about 1 GB).
    """
    if x.shape[0] < 2:
        raise ValueError(f"PCA needs at least 2 images, got {x.shape[0]}")
    flat = x.flatten(1).double()  # (N, D)
    mean = flat.mean(0)
    _, singular_values, vh = torch.linalg.svd(flat - mean, full_matrices=False)
    variances = singular_values.square() / (flat.shape[0] - 1)
    return PCA(mean, vh, variances, tuple(x.shape[1:]))


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spaces of a (D, k) and b (D, m).

    The cosines are the singular values of Qa^T Qb for orthonormal bases Qa, Qb; 0 means the
    subspaces share that direction.
    """
    qa, _ = torch.linalg.qr(a.double())
    qb, _ = torch.linalg.qr(b.double())
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(-1.0, 1.0)
    return torch.arccos(cosines)  # svdvals are descending, so the angles ascend
