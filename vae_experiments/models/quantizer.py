"""Vector quantisation onto a learned codebook (van den Oord et al. 2017, "Neural Discrete
Representation Learning", https://arxiv.org/abs/1711.00937): nearest-neighbour assignment,
straight-through gradients, the codebook and commitment losses, codebook updates by exponential
moving averages (the paper's appendix A.1) as an option, and restarts of codes left unused.

Plain torch. In a multi-process run (DDP) the code counts, the EMA statistics and the restarts
are shared over the processes (``torch.distributed``), so every process keeps the same codebook.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vae_experiments.targets import ConfigError


class Quantized(NamedTuple):
    """What :meth:`VectorQuantizer.forward` gives for encoder outputs z_e (B, D, h, w)."""

    #: (B, h, w) int64: the index of each position's nearest code.
    codes: torch.Tensor
    #: (B, D, h, w): the nearest codes' vectors in the forward pass, and z_e's identity in the
    #: backward pass (straight-through): the decoder's gradient reaches the encoder unchanged.
    straight_through: torch.Tensor
    #: (B,): ||sg[z_e] - e||^2 per image, summed over positions and dims; trains the codebook.
    codebook_loss: torch.Tensor
    #: (B,): ||z_e - sg[e]||^2 per image, the same sum; keeps the encoder near its codes.
    commitment_loss: torch.Tensor
    #: (): exp of the entropy of the batch's code histogram (K when all codes are used equally).
    perplexity: torch.Tensor
    #: (): how many codes the batch used at least once.
    codes_in_use: torch.Tensor


def _processes() -> int:
    """How many processes share the training (1 outside ``torch.distributed``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over every process of a distributed run (in place); as it is otherwise."""
    if _processes() > 1:
        dist.all_reduce(tensor)
    return tensor


class VectorQuantizer(nn.Module):
    """A codebook of ``num_codes`` vectors of size ``code_dim``; maps each vector of a grid to
    its nearest code (squared Euclidean distance).

    In training mode the codebook is also updated in the forward pass: with ``ema_decay`` by the
    exponential moving averages of the paper's appendix A.1 (the codebook is then a buffer, and
    the codebook loss trains nothing), and with ``dead_code_steps`` every code that no position
    chose for that many training steps in a row is restarted at a random encoder output of the
    current batch (a code far from every encoding gets no gradient and would stay dead). Neither
    happens in eval mode.

    Args:
        num_codes: K, the codebook size; at least 2.
        code_dim: D, the size of each code (the encoder's output channels).
        ema_decay: null for a codebook trained by the codebook loss, or the decay in (0, 1) of
            the moving averages (the paper uses 0.99).
        dead_code_steps: restart codes unused for this many training steps (null: never).
        ema_epsilon: the additive (Laplace) smoothing of the EMA code counts, so that a code
            whose count decayed to nothing is not divided by zero.
    """

    def __init__(
        self,
        num_codes: int,
        code_dim: int,
        ema_decay: float | None,
        dead_code_steps: int | None,
        ema_epsilon: float = 1e-5,
    ):
        super().__init__()
        if num_codes < 2:
            raise ConfigError(
                "num_codes", num_codes, "must be an integer >= 2 (one code carries no information)"
            )
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ConfigError(
                "ema_decay", ema_decay, "must be null (a codebook trained by its loss) or in (0, 1)"
            )
        if dead_code_steps is not None and dead_code_steps < 1:
            raise ConfigError(
                "dead_code_steps", dead_code_steps, "must be null (no restarts) or an integer >= 1"
            )
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.ema_decay = ema_decay
        self.dead_code_steps = dead_code_steps
        self.ema_epsilon = ema_epsilon
        # The paper's implementation's start: small codes near the origin, each the nearest to
        # some directions of the encodings.
        codebook = torch.empty(num_codes, code_dim).uniform_(-1 / num_codes, 1 / num_codes)
        if ema_decay is None:
            self.codebook = nn.Parameter(codebook)
        else:
            self.register_buffer("codebook", codebook)
            # Moving averages of each code's count and of the sum of its encodings: the code is
            # their ratio. Started as one encoding at the code itself.
            self.register_buffer("ema_count", torch.ones(num_codes))
            self.register_buffer("ema_sum", codebook.clone())
        # Training steps since each code was last chosen (counted in training mode only).
        self.register_buffer("unused_steps", torch.zeros(num_codes, dtype=torch.long))

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """The index (N,) of the nearest code to each vector of ``flat`` (N, D)."""
        # In float32 also under autocast: a bf16 distance would pick the wrong code.
        with torch.no_grad(), torch.autocast(flat.device.type, enabled=False):
            codebook = self.codebook.float()
            vectors = flat.float()
            # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2, (N, K) without an (N, K, D) difference.
            distances = (
                vectors.square().sum(1, keepdim=True)
                - 2 * vectors @ codebook.T
                + codebook.square().sum(1)
            )
            return distances.argmin(1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """The codes' vectors: indices (B, h, w) -> (B, D, h, w)."""
        return F.embedding(codes, self.codebook).permute(0, 3, 1, 2)

    def forward(self, z_e: torch.Tensor) -> Quantized:
        """Quantises encoder outputs z_e (B, D, h, w); see :class:`Quantized`."""
        b, d, h, w = z_e.shape  # batch, code size, grid height, grid width
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D), one row per position
        indices = self.nearest(flat)  # (B*h*w,)
        codes = indices.view(b, h, w)
        z_q = self.lookup(codes).to(z_e.dtype)  # (B, D, h, w)
        codebook_loss = (z_q - z_e.detach()).square().flatten(1).sum(1)
        commitment_loss = (z_e - z_q.detach()).square().flatten(1).sum(1)
        straight_through = z_e + (z_q - z_e).detach()

        with torch.no_grad(), torch.autocast(flat.device.type, enabled=False):
            # (N, K) one-hot assignments: counts and sums without a scatter, so they are
            # deterministic on a GPU too; float32 (bf16 counts stop at 256).
            assignments = F.one_hot(indices, self.num_codes).float()
            counts = assignments.sum(0)  # (K,) positions per code in this batch
            probabilities = counts / counts.sum()
            entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-30))).sum()
            perplexity = entropy.exp()
            codes_in_use = (counts > 0).sum().float()
            if self.training:
                self._update(flat.detach(), assignments, counts)
        return Quantized(
            codes, straight_through, codebook_loss, commitment_loss, perplexity, codes_in_use
        )

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, assignments: torch.Tensor, counts: torch.Tensor) -> None:
        """A training step's codebook update: the moving averages (with ``ema_decay``) and the
        restarts of dead codes (with ``dead_code_steps``), from this batch's encodings ``flat``
        (N, D), their one-hot ``assignments`` (N, K) and the codes' ``counts`` (K,). No host
        sync: every choice is a ``torch.where``."""
        counts = _sum_over_processes(counts.float().clone())
        if self.ema_decay is not None:
            sums = _sum_over_processes(assignments.T @ flat.float())  # (K, D)
            decay = self.ema_decay
            self.ema_count.mul_(decay).add_(counts, alpha=1 - decay)
            self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
            total = self.ema_count.sum()
            smoothed = (self.ema_count + self.ema_epsilon) / (
                total + self.num_codes * self.ema_epsilon
            )
            self.codebook.copy_(self.ema_sum / (smoothed * total)[:, None])
        if self.dead_code_steps is None:
            return
        self.unused_steps.copy_(torch.where(counts > 0, 0, self.unused_steps + 1))
        dead = self.unused_steps >= self.dead_code_steps  # (K,)
        # A random encoding of this batch for every code; only the dead ones take theirs. All
        # processes take the first one's, so that their codebooks stay equal.
        picks = torch.randint(0, flat.shape[0], (self.num_codes,), device=flat.device)
        candidates = flat[picks].to(self.codebook.dtype)  # (K, D)
        if _processes() > 1:
            dist.broadcast(candidates, src=0)
        self.codebook.copy_(torch.where(dead[:, None], candidates, self.codebook))
        if self.ema_decay is not None:
            self.ema_sum.copy_(torch.where(dead[:, None], candidates, self.ema_sum))
            self.ema_count.copy_(torch.where(dead, 1.0, self.ema_count))
        self.unused_steps.masked_fill_(dead, 0)
