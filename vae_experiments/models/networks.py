"""Encoder and decoder bodies whose sizes are derived from the data's image shape.

An encoder maps images (B, C, H, W) to a flat code (B, out_features); a decoder maps a latent
(B, latent_dim) back to a tensor of exactly the image shape (B, C, H, W). What the decoder output
means (logits, a Gaussian mean, a plain reconstruction) is decided by the likelihood, not here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

ImageShape = tuple[int, int, int]


def _check_image_shape(image_shape: Sequence[int]) -> ImageShape:
    if len(image_shape) != 3 or any(int(s) < 1 for s in image_shape):
        raise ValueError(f"image_shape must be (channels, height, width) >= 1, got {image_shape}")
    c, h, w = (int(s) for s in image_shape)
    return c, h, w


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers between consecutive sizes, ReLU between them but not after the last."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """Flattens the image and applies an MLP; with no hidden layers it is a single affine map."""

    def __init__(self, image_shape: Sequence[int], hidden_dims: Sequence[int], out_features: int):
        super().__init__()
        self.image_shape = _check_image_shape(image_shape)
        self.out_features = out_features
        self.net = _mlp([math.prod(self.image_shape), *hidden_dims, out_features])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))  # (B, C*H*W) -> (B, out_features)


class MLPDecoder(nn.Module):
    """MLP from the latent to C*H*W outputs, reshaped to the image shape."""

    def __init__(self, image_shape: Sequence[int], hidden_dims: Sequence[int], latent_dim: int):
        super().__init__()
        self.image_shape = _check_image_shape(image_shape)
        self.net = _mlp([latent_dim, *hidden_dims, math.prod(self.image_shape)])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(-1, *self.image_shape)  # (B, C*H*W) -> (B, C, H, W)


def conv_feature_sizes(height: int, width: int, max_blocks: int) -> list[tuple[int, int]]:
    """Spatial sizes after each stride-2 block, starting with the input size.

    A 3x3, stride-2, padding-1 convolution maps a side n to ceil(n / 2). Blocks are added while
    both sides stay >= 2 after halving and fewer than ``max_blocks`` are used, so 8x8 gets 2
    blocks (8 -> 4 -> 2), 28x28 gets 4 (28 -> 14 -> 7 -> 4 -> 2) and 64x64 gets 5 (-> 2x2).
    """
    sizes = [(height, width)]
    while len(sizes) - 1 < max_blocks:
        h, w = sizes[-1]
        h2, w2 = (h + 1) // 2, (w + 1) // 2
        if h2 < 2 or w2 < 2:
            break
        sizes.append((h2, w2))
    return sizes


def _conv_block(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(n_in, n_out, kernel_size=3, stride=2, padding=1),
        nn.BatchNorm2d(n_out),
        nn.LeakyReLU(),
    )


def _deconv_block(n_in: int, n_out: int, output_padding: tuple[int, int]) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(
            n_in, n_out, kernel_size=3, stride=2, padding=1, output_padding=output_padding
        ),
        nn.BatchNorm2d(n_out),
        nn.LeakyReLU(),
    )


class _ConvGeometry:
    """Block count, channel list and per-block sizes shared by a conv encoder and its decoder."""

    def __init__(self, image_shape: Sequence[int], channels: Sequence[int]):
        self.image_shape = _check_image_shape(image_shape)
        if not channels or any(int(c) < 1 for c in channels):
            raise ValueError(
                f"model.conv_channels must be a non-empty list of ints >= 1, got {channels}"
            )
        _, h, w = self.image_shape
        self.sizes = conv_feature_sizes(h, w, max_blocks=len(channels))
        if len(self.sizes) < 2:
            raise ValueError(
                f"image shape {tuple(self.image_shape)} is too small for the conv arch (it needs "
                "height and width >= 3 for one stride-2 block); use model.arch=mlp"
            )
        self.channels = [int(c) for c in channels[: len(self.sizes) - 1]]
        last_h, last_w = self.sizes[-1]
        self.flat_features = self.channels[-1] * last_h * last_w


class ConvEncoder(nn.Module):
    """Stride-2 Conv-BatchNorm-LeakyReLU blocks, then a linear layer to ``out_features``.

    Generalises the classic VanillaVAE encoder: the number of blocks and the flattened size follow
    from the image shape, so the same config serves 8x8, 28x28, 64x64 or non-square images.
    """

    def __init__(self, image_shape: Sequence[int], channels: Sequence[int], out_features: int):
        super().__init__()
        geometry = _ConvGeometry(image_shape, channels)
        self.image_shape = geometry.image_shape
        self.out_features = out_features
        in_channels = [self.image_shape[0], *geometry.channels[:-1]]
        self.blocks = nn.Sequential(
            *(
                _conv_block(c_in, c_out)
                for c_in, c_out in zip(in_channels, geometry.channels, strict=True)
            )
        )
        self.head = nn.Linear(geometry.flat_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.blocks(x)  # (B, C_last, h_last, w_last)
        return self.head(features.flatten(1))


class ConvDecoder(nn.Module):
    """Mirror of :class:`ConvEncoder`: linear layer, transposed-conv blocks, 3x3 output conv.

    Each transposed convolution undoes one encoder block exactly (``output_padding`` is 1 where
    the encoder halved an even side and 0 where it rounded an odd side up), so the output has the
    input's height and width, whatever they are.
    """

    def __init__(self, image_shape: Sequence[int], channels: Sequence[int], latent_dim: int):
        super().__init__()
        geometry = _ConvGeometry(image_shape, channels)
        self.image_shape = geometry.image_shape
        self.latent_shape = (geometry.channels[-1], *geometry.sizes[-1])
        self.head = nn.Linear(latent_dim, geometry.flat_features)
        # Block i upsamples sizes[i+1] -> sizes[i]; channels run back from the deepest to the first.
        out_channels = [geometry.channels[0], *geometry.channels[:-1]]
        blocks = []
        for i in reversed(range(len(geometry.channels))):
            (h_out, w_out), (h_in, w_in) = geometry.sizes[i], geometry.sizes[i + 1]
            padding = (h_out - (2 * h_in - 1), w_out - (2 * w_in - 1))
            blocks.append(_deconv_block(geometry.channels[i], out_channels[i], padding))
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv2d(geometry.channels[0], self.image_shape[0], kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        features = self.head(z).view(-1, *self.latent_shape)  # (B, C_last, h_last, w_last)
        return self.out(self.blocks(features))  # (B, C, H, W)


ARCHS = ("linear", "mlp", "conv")


def build_encoder_decoder(
    arch: str,
    image_shape: Sequence[int],
    latent_dim: int,
    code_features: int,
    hidden_dims: Sequence[int] | None = None,
    conv_channels: Sequence[int] | None = None,
) -> tuple[nn.Module, nn.Module]:
    """Builds a matching encoder/decoder pair.

    Args:
        arch: ``linear`` (one affine map each way), ``mlp`` or ``conv``.
        image_shape: (C, H, W) of the data.
        latent_dim: size of the decoder's input.
        code_features: size of the encoder's output (``latent_dim``, or ``2 * latent_dim`` for a
            Gaussian posterior's mean and log-variance).
        hidden_dims: MLP hidden sizes from the image side (the decoder uses them reversed).
        conv_channels: conv block channels from the image side.
    """
    if latent_dim < 1:
        raise ValueError(f"model.latent_dim must be >= 1, got {latent_dim}")
    if arch == "linear":
        return (
            MLPEncoder(image_shape, [], code_features),
            MLPDecoder(image_shape, [], latent_dim),
        )
    if arch == "mlp":
        if hidden_dims is None:
            raise ValueError("model.arch=mlp needs model.hidden_dims (e.g. [512, 256])")
        hidden = [int(h) for h in hidden_dims]
        return (
            MLPEncoder(image_shape, hidden, code_features),
            MLPDecoder(image_shape, hidden[::-1], latent_dim),
        )
    if arch == "conv":
        if conv_channels is None:
            raise ValueError(
                "model.arch=conv needs model.conv_channels (e.g. [32, 64, 128, 256, 512])"
            )
        return (
            ConvEncoder(image_shape, conv_channels, code_features),
            ConvDecoder(image_shape, conv_channels, latent_dim),
        )
    raise ValueError(f"unknown model.arch={arch!r}; choose one of {', '.join(ARCHS)}")
