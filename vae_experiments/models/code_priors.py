"""Priors over grids of discrete codes: a VQ-VAE's second stage, fitted to its training codes
after the VQ-VAE itself (van den Oord et al. 2017, https://arxiv.org/abs/1711.00937, section 3.2).

A prior is a module of its own (:class:`CodePrior`): ``log_prob(codes)`` of grids (B, h, w) in
nats and ``sample(n)``. Two ship:

- :class:`GatedPixelCNN`: an autoregressive prior, each code given the codes above it and to its
  left in raster order (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN
  Decoders", https://arxiv.org/abs/1606.05328), trained by maximum likelihood;
- :class:`CodeFrequencies`: each position's code frequencies, independent of the other
  positions: the cheap baseline the PixelCNN must beat.

What ``model.prior`` names in a config is a recipe (:class:`PriorRecipe`: :class:`PixelCNN`,
:class:`Frequencies`), as ``model.network`` names a body: it holds the settings, is checked
against the VQ-VAE's code grid when the model is built (so a grid too small for it fails at
start), and builds and fits the prior module once the codes exist.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vae_experiments.targets import ConfigError

log = logging.getLogger(__name__)

GridShape = tuple[int, int]


def _draw(probabilities: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One category per row of ``probabilities`` (N, K), drawn with ``generator`` on its own
    device (a CPU generator gives the same draws for a prior on any device): (N,) int64 on
    ``probabilities``' device."""
    where = generator.device if generator is not None else probabilities.device
    drawn = torch.multinomial(probabilities.float().to(where), 1, generator=generator)
    return drawn.squeeze(1).to(probabilities.device)


class CodePrior(nn.Module):
    """A distribution over grids of codes (B, h, w), integers in ``[0, num_codes)``.

    Subclasses implement ``log_prob(codes) -> (B,)`` (nats per grid: summed over its h * w
    positions) and ``sample(n, generator) -> (n, h, w)``.

    Args:
        grid_shape: (h, w) of the code grid.
        num_codes: K, the codebook size.
    """

    def __init__(self, grid_shape: Sequence[int], num_codes: int):
        super().__init__()
        self.grid_shape: GridShape = (int(grid_shape[0]), int(grid_shape[1]))
        self.num_codes = int(num_codes)

    def log_prob(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def check_codes(self, codes: torch.Tensor) -> None:
        """Raises ``ValueError`` unless ``codes`` is a (B, h, w) integer grid of this prior."""
        if codes.ndim != 3 or tuple(codes.shape[1:]) != self.grid_shape:
            raise ValueError(
                f"codes must have shape (B, {self.grid_shape[0]}, {self.grid_shape[1]}), got "
                f"{tuple(codes.shape)}"
            )
        if codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"codes must be integers, got {codes.dtype}")

    @property
    def device(self) -> torch.device:
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            return tensor.device
        return torch.device("cpu")


@torch.no_grad()
def bits_per_code(prior: CodePrior, codes: torch.Tensor, batch_size: int = 1000) -> float:
    """The prior's mean negative log-likelihood of code grids (N, h, w), in bits per code:
    ``-log p(grid) / (h * w * ln 2)`` averaged over the grids (log2 K for a uniform prior)."""
    was_training = prior.training
    prior.eval()
    try:
        total = sum(
            float(-prior.log_prob(chunk.to(prior.device)).double().sum())
            for chunk in codes.split(batch_size)
        )
    finally:
        prior.train(was_training)
    positions = codes.shape[1] * codes.shape[2]
    return total / (len(codes) * positions * math.log(2))


class CodeFrequencies(CodePrior):
    """Independent positions, each with its own code frequencies: p(grid) = prod_ij p_ij(c_ij).

    ``log_probs`` (h, w, K) holds log p_ij(k); :meth:`fit` sets it from counts, with
    ``pseudo_count`` added to every count so that a code never seen at a position keeps a
    finite log-probability. Uniform until fitted.
    """

    def __init__(self, grid_shape: Sequence[int], num_codes: int, pseudo_count: float):
        super().__init__(grid_shape, num_codes)
        self.pseudo_count = float(pseudo_count)
        uniform = torch.full((*self.grid_shape, self.num_codes), -math.log(self.num_codes))
        self.register_buffer("log_probs", uniform)

    @torch.no_grad()
    def fit(self, codes: torch.Tensor) -> CodeFrequencies:
        """Sets the frequencies from code grids (N, h, w): (count + pseudo_count) / (N +
        K pseudo_count) at each position."""
        self.check_codes(codes)
        counts = F.one_hot(codes.to(self.log_probs.device), self.num_codes).double().sum(0)
        smoothed = counts + self.pseudo_count  # (h, w, K)
        self.log_probs.copy_((smoothed / smoothed.sum(-1, keepdim=True)).log())
        return self

    def log_prob(self, codes: torch.Tensor) -> torch.Tensor:
        self.check_codes(codes)
        b, positions = codes.shape[0], math.prod(self.grid_shape)
        table = self.log_probs.view(1, positions, self.num_codes).expand(b, -1, -1)
        chosen = table.gather(2, codes.reshape(b, positions, 1))  # (B, h*w, 1)
        return chosen.squeeze(2).sum(1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        probabilities = self.log_probs.exp().view(-1, self.num_codes)  # (h*w, K)
        where = generator.device if generator is not None else probabilities.device
        drawn = torch.multinomial(probabilities.to(where), n, replacement=True, generator=generator)
        return drawn.to(probabilities.device).T.reshape(n, *self.grid_shape)  # (h*w, n) -> grids


def _gate(features: torch.Tensor) -> torch.Tensor:
    """The gated activation tanh(a) * sigmoid(b) of features (B, 2C, h, w) split into a and b."""
    a, b = features.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class _GatedLayer(nn.Module):
    """One layer of a gated PixelCNN: a vertical stack (the rows above) and a horizontal stack
    (the row so far), as in van den Oord et al. 2016, figure 2, without the blind spot of a
    masked 3x3 PixelCNN.

    Causality comes from the kernels' shapes and a crop instead of masked weights. The vertical
    convolution spans ``half + 1`` rows, padded by ``half`` above and below; keeping the first h
    output rows makes output row i see input rows i - half .. i. The first layer's spans
    ``half`` rows, so that it sees rows i - half .. i - 1 only: from then on the vertical stack
    at row i holds rows above i, and may see its own row in later layers. The horizontal
    convolution likewise sees columns j - half .. j of its own row (j - 1 in the first layer,
    whose input is the code at (i, j) itself); the vertical stack's features at row i (rows
    above) are added to it. The first layer's horizontal stack has no residual connection,
    which would carry the code at (i, j) forward.
    """

    def __init__(self, channels: int, kernel_size: int, first: bool):
        super().__init__()
        half = kernel_size // 2
        span = half if first else half + 1
        self.first = first
        self.vertical = nn.Conv2d(channels, 2 * channels, (span, kernel_size), padding=half)
        self.horizontal = nn.Conv2d(channels, 2 * channels, (1, span), padding=(0, half))
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal_out = nn.Conv2d(channels, channels, 1)

    def forward(
        self, vertical: torch.Tensor, horizontal: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both stacks (B, C, h, w) -> both stacks after this layer."""
        height, width = vertical.shape[-2:]
        v = self.vertical(vertical)[..., :height, :]  # (B, 2C, h, w): rows above i
        h = self.horizontal(horizontal)[..., :width]  # (B, 2C, h, w): the row up to j
        h = self.horizontal_out(_gate(h + self.vertical_to_horizontal(v)))
        return _gate(v), h if self.first else horizontal + h


class GatedPixelCNN(CodePrior):
    """An autoregressive prior over code grids in raster order:
    p(grid) = prod_ij p(c_ij | the codes above row i, and left of j in row i).

    Codes are embedded (K -> ``channels``), pass ``layers`` gated layers (:class:`_GatedLayer`)
    and two 1x1 convolutions to K logits per position, so one forward pass gives every
    conditional of a grid: ``log_prob`` is one pass, ``sample`` one pass per position.

    Args:
        grid_shape: (h, w) of the code grid.
        num_codes: K.
        channels: feature channels of each stack.
        layers: gated layers (>= 1); each adds ``kernel_size // 2`` rows and columns of context.
        kernel_size: odd, >= 3; the first layer reaches ``kernel_size // 2`` rows above and
            columns either side.
    """

    def __init__(
        self,
        grid_shape: Sequence[int],
        num_codes: int,
        channels: int,
        layers: int,
        kernel_size: int,
    ):
        super().__init__(grid_shape, num_codes)
        self.embedding = nn.Embedding(num_codes, channels)
        self.layers = nn.ModuleList(
            _GatedLayer(channels, kernel_size, first=index == 0) for index in range(layers)
        )
        self.head = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
            nn.ReLU(),
            nn.Conv2d(channels, num_codes, 1),
        )

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Logits (B, K, h, w) of each position's code given the codes before it, for code
        grids (B, h, w)."""
        x = self.embedding(codes).permute(0, 3, 1, 2)  # (B, h, w, C) -> (B, C, h, w)
        vertical, horizontal = x, x
        for layer in self.layers:
            vertical, horizontal = layer(vertical, horizontal)
        return self.head(horizontal)

    def log_prob(self, codes: torch.Tensor) -> torch.Tensor:
        self.check_codes(codes)
        logits = self(codes)
        return -F.cross_entropy(logits, codes, reduction="none").flatten(1).sum(1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n grids (n, h, w), drawn position by position in raster order."""
        was_training = self.training
        self.eval()
        codes = torch.zeros(n, *self.grid_shape, dtype=torch.long, device=self.device)
        try:
            for i in range(self.grid_shape[0]):
                for j in range(self.grid_shape[1]):
                    logits = self(codes)[:, :, i, j]  # (n, K)
                    codes[:, i, j] = _draw(logits.float().softmax(1), generator)
        finally:
            self.train(was_training)
        return codes


# ---------------------------------------------------------------------------------------------
# Recipes: what ``model.prior`` names. Each checks its settings against a code grid, builds its
# prior for the grid and fits it to codes.


class PriorRecipe:
    """How to make a prior over a VQ-VAE's code grids: its settings, checked in the constructor
    (a bad value fails when the config is built, naming its key) and against the grid in
    :meth:`check`; :meth:`fit` builds the prior and fits it to training codes.

    Attributes:
        name: what files, image grids and metrics of this kind of prior are called after.
    """

    name: str = ""

    def check(self, grid_shape: Sequence[int], num_codes: int) -> None:
        """Raises :class:`ConfigError` naming a setting of this recipe that the code grid
        (h, w) of ``num_codes`` codes cannot take."""

    def build(self, grid_shape: Sequence[int], num_codes: int) -> CodePrior:
        """An unfitted prior for grids (h, w) of ``num_codes`` codes."""
        raise NotImplementedError

    def fit(
        self,
        codes: torch.Tensor,
        num_codes: int,
        val_codes: torch.Tensor | None = None,
        seed: int = 0,
    ) -> CodePrior:
        """A prior fitted to training code grids ``codes`` (N, h, w) (on their device), in eval
        mode; ``val_codes`` may choose among its fits (a PixelCNN keeps its best epoch's)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The config node that builds this recipe again (``_target_`` and its settings)."""
        return {"_target_": f"{type(self).__module__}.{type(self).__qualname__}", **vars(self)}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Frequencies(PriorRecipe):
    """Each position's code frequencies (:class:`CodeFrequencies`): the cheap baseline, fitted
    by counting.

    Args:
        pseudo_count: added to every count (> 0; 0.5 is the Krichevsky-Trofimov estimator), so
            that a code unseen at a position in training has a finite log-probability.
    """

    name = "frequencies"

    def __init__(self, pseudo_count: float):
        if not pseudo_count > 0:
            raise ConfigError(
                "pseudo_count", pseudo_count, "must be a number > 0 (unseen codes get it)"
            )
        self.pseudo_count = float(pseudo_count)

    def build(self, grid_shape: Sequence[int], num_codes: int) -> CodeFrequencies:
        return CodeFrequencies(grid_shape, num_codes, self.pseudo_count)

    def fit(
        self,
        codes: torch.Tensor,
        num_codes: int,
        val_codes: torch.Tensor | None = None,
        seed: int = 0,
    ) -> CodeFrequencies:
        prior = self.build(codes.shape[1:], num_codes).to(codes.device)
        return prior.fit(codes).eval()


class PixelCNN(PriorRecipe):
    """A gated PixelCNN over the code grid (:class:`GatedPixelCNN`), trained by maximum
    likelihood with Adam; the epoch with the lowest validation bits per code is kept.

    Args:
        channels: feature channels of each stack.
        layers: gated layers.
        kernel_size: odd, >= 3. The code grid must be larger than the first layer's reach:
            ``kernel_size // 2`` rows above and columns either side must fit in it.
        epochs: passes over the training codes.
        lr: Adam's learning rate.
        batch_size: code grids per step.
    """

    name = "pixelcnn"

    def __init__(
        self,
        channels: int,
        layers: int,
        kernel_size: int,
        epochs: int,
        lr: float,
        batch_size: int,
    ):
        for key, value in (
            ("channels", channels),
            ("layers", layers),
            ("epochs", epochs),
            ("batch_size", batch_size),
        ):
            if value < 1:
                raise ConfigError(key, value, "must be an integer >= 1")
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ConfigError("kernel_size", kernel_size, "must be an odd integer >= 3")
        if not lr > 0:
            raise ConfigError("lr", lr, "must be a number > 0")
        self.channels = int(channels)
        self.layers = int(layers)
        self.kernel_size = int(kernel_size)
        self.epochs = int(epochs)
        self.lr = float(lr)
        self.batch_size = int(batch_size)

    def check(self, grid_shape: Sequence[int], num_codes: int) -> None:
        h, w = (int(s) for s in grid_shape)
        half = self.kernel_size // 2
        if half < min(h, w):
            return
        largest = 2 * min(h, w) - 1
        fix = (
            f"use model.prior.kernel_size={largest} or less"
            if largest >= 3
            else "use model/prior=frequencies, or a larger grid (model.min_grid_size)"
        )
        raise ConfigError(
            "kernel_size",
            self.kernel_size,
            f"the code grid is {h}x{w}, smaller than the PixelCNN's receptive field: its first "
            f"layer reaches {half} rows above and {half} columns either side of a position; {fix}",
        )

    def build(self, grid_shape: Sequence[int], num_codes: int) -> GatedPixelCNN:
        return GatedPixelCNN(grid_shape, num_codes, self.channels, self.layers, self.kernel_size)

    def fit(
        self,
        codes: torch.Tensor,
        num_codes: int,
        val_codes: torch.Tensor | None = None,
        seed: int = 0,
    ) -> GatedPixelCNN:
        """Trains a new PixelCNN on ``codes`` (N, h, w); logs each epoch's bits per code.

        Gradients are on whatever the caller's mode (a Lightning hook of the test loop runs in
        inference mode).
        """
        with torch.inference_mode(False), torch.enable_grad():
            # Copies made outside inference mode: autograd keeps the codes for the backward pass.
            return self._fit(
                codes.clone(), num_codes, None if val_codes is None else val_codes.clone(), seed
            )

    def _fit(
        self, codes: torch.Tensor, num_codes: int, val_codes: torch.Tensor | None, seed: int
    ) -> GatedPixelCNN:
        self.check(codes.shape[1:], num_codes)
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # seeded initial weights, global RNG untouched
            torch.manual_seed(seed)
            prior = self.build(codes.shape[1:], num_codes)
        prior = prior.to(codes.device)
        optimizer = torch.optim.Adam(prior.parameters(), lr=self.lr)
        positions = codes.shape[1] * codes.shape[2]
        best: tuple[float, dict[str, torch.Tensor]] | None = None
        for epoch in range(self.epochs):
            prior.train()
            order = torch.randperm(len(codes), generator=generator).to(codes.device)
            total = codes.new_zeros((), dtype=torch.float64)
            for batch in order.split(self.batch_size):
                nll = -prior.log_prob(codes[batch])  # (B,) nats per grid
                optimizer.zero_grad()
                nll.mean().backward()
                optimizer.step()
                total += nll.detach().sum()
            train_bits = float(total) / (len(codes) * positions * math.log(2))
            if not math.isfinite(train_bits):
                raise FloatingPointError(
                    f"the PixelCNN prior's training loss became {train_bits} in epoch {epoch}; "
                    f"try a lower model.prior.lr (now {self.lr:g})"
                )
            val_bits = bits_per_code(prior, val_codes) if val_codes is not None else train_bits
            log.info(
                "prior %s epoch %d/%d: %.4f bits per code on the training codes%s",
                self.name,
                epoch + 1,
                self.epochs,
                train_bits,
                f", {val_bits:.4f} on the validation codes" if val_codes is not None else "",
            )
            if best is None or val_bits < best[0]:
                best = (val_bits, copy.deepcopy(prior.state_dict()))
        if best is not None:
            prior.load_state_dict(best[1])
        return prior.eval()
