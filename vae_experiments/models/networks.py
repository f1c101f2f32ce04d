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

from vae_experiments.targets import ConfigError

ImageShape = tuple[int, int, int]


def _check_image_shape(image_shape: Sequence[int]) -> ImageShape:
    if len(image_shape) != 3 or any(int(s) < 1 for s in image_shape):
        raise ConfigError(
            "image_shape", list(image_shape), "must be [channels, height, width], each >= 1"
        )
    c, h, w = (int(s) for s in image_shape)
    return c, h, w


def _check_sizes(name: str, sizes: Sequence[int], non_empty: bool) -> None:
    """Layer sizes must be integers >= 1 (and at least one where ``non_empty``)."""
    if (non_empty and not sizes) or any(int(size) < 1 for size in sizes):
        rule = "a non-empty list of integers >= 1" if non_empty else "a list of integers >= 1"
        raise ConfigError(name, list(sizes), f"must be {rule}")


#: The nonlinearities an MLP body can use between its layers, by config name.
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


def _mlp(sizes: Sequence[int], activation: str = "relu") -> nn.Sequential:
    """Linear layers between consecutive sizes, ``activation`` between them but not after the
    last."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """Flattens the image and applies an MLP; with no hidden layers it is a single affine map."""

    def __init__(
        self,
        image_shape: Sequence[int],
        hidden_dims: Sequence[int],
        out_features: int,
        activation: str = "relu",
    ):
        super().__init__()
        self.image_shape = _check_image_shape(image_shape)
        self.out_features = out_features
        self.net = _mlp([math.prod(self.image_shape), *hidden_dims, out_features], activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))  # (B, C*H*W) -> (B, out_features)


class MLPDecoder(nn.Module):
    """MLP from the latent to C*H*W outputs, reshaped to the image shape."""

    def __init__(
        self,
        image_shape: Sequence[int],
        hidden_dims: Sequence[int],
        latent_dim: int,
        activation: str = "relu",
    ):
        super().__init__()
        self.image_shape = _check_image_shape(image_shape)
        self.net = _mlp([latent_dim, *hidden_dims, math.prod(self.image_shape)], activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(-1, *self.image_shape)  # (B, C*H*W) -> (B, C, H, W)


def conv_feature_sizes(
    height: int, width: int, max_blocks: int, min_size: int = 2
) -> list[tuple[int, int]]:
    """Spatial sizes after each stride-2 block, starting with the input size.

    A 3x3, stride-2, padding-1 convolution maps a side n to ceil(n / 2). Blocks are added while
    both sides stay >= ``min_size`` after halving and fewer than ``max_blocks`` are used, so with
    the default 2, 8x8 gets 2 blocks (8 -> 4 -> 2), 28x28 gets 4 (28 -> 14 -> 7 -> 4 -> 2) and
    64x64 gets 5 (-> 2x2); a VQ-VAE's code grid keeps sides >= 4 (8x8 -> 4x4, 28x28 -> 7x7 with
    two blocks).
    """
    sizes = [(height, width)]
    while len(sizes) - 1 < max_blocks:
        h, w = sizes[-1]
        h2, w2 = (h + 1) // 2, (w + 1) // 2
        if h2 < min_size or w2 < min_size:
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


class ResidualBlock(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x)))) at constant channels and size (B, C, h, w): the
    residual 3x3 block of van den Oord et al. 2017's VQ-VAE ("ReLU, 3x3 conv, ReLU, 1x1 conv"),
    its hidden width the block's channels."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)  # (B, C, h, w)


def _residual_stack(channels: int, blocks: int) -> nn.Sequential:
    """``blocks`` :class:`ResidualBlock` s at the deepest conv block's channels; none (an empty
    Sequential, no parameters, the same state_dict as before the option) for 0."""
    return nn.Sequential(*(ResidualBlock(channels) for _ in range(blocks)))


class _ConvGeometry:
    """Block count, channel list and per-block sizes shared by a conv encoder and its decoder.

    ``min_size``: the smallest side the blocks may leave (:func:`conv_feature_sizes`); the
    default 2 is the flat-code networks', a VQ-VAE passes its ``min_grid_size``.
    """

    def __init__(self, image_shape: Sequence[int], channels: Sequence[int], min_size: int = 2):
        self.image_shape = _check_image_shape(image_shape)
        _check_sizes("channels", channels, non_empty=True)
        _, h, w = self.image_shape
        self.sizes = conv_feature_sizes(h, w, max_blocks=len(channels), min_size=min_size)
        if len(self.sizes) < 2:
            fix = (
                "use model/network=mlp, or larger images"
                if min_size == 2
                else f"lower model.min_grid_size (now {min_size}), or use larger images"
            )
            raise ConfigError(
                allowed=f"a conv network cannot take images of shape {self.image_shape}: its "
                f"stride-2 blocks need height and width >= {2 * min_size - 1}; {fix} "
                "(data.source.image_size with data=image_folder or data=celeba, "
                "data.source.image_shape with data=synthetic)"
            )
        self.channels = [int(c) for c in channels[: len(self.sizes) - 1]]
        last_h, last_w = self.sizes[-1]
        self.flat_features = self.channels[-1] * last_h * last_w


def _down_blocks(in_channels: int, geometry: _ConvGeometry) -> nn.Sequential:
    """The stride-2 blocks of a conv encoder: ``in_channels`` image channels to
    ``geometry.channels[-1]`` at ``geometry.sizes[-1]``."""
    inputs = [in_channels, *geometry.channels[:-1]]
    return nn.Sequential(
        *(_conv_block(c_in, c_out) for c_in, c_out in zip(inputs, geometry.channels, strict=True))
    )


def _up_blocks(geometry: _ConvGeometry) -> nn.Sequential:
    """The transposed-conv blocks of a conv decoder, undoing :func:`_down_blocks` exactly."""
    # Block i upsamples sizes[i+1] -> sizes[i]; channels run back from the deepest to the first.
    out_channels = [geometry.channels[0], *geometry.channels[:-1]]
    blocks = []
    for i in reversed(range(len(geometry.channels))):
        (h_out, w_out), (h_in, w_in) = geometry.sizes[i], geometry.sizes[i + 1]
        padding = (h_out - (2 * h_in - 1), w_out - (2 * w_in - 1))
        blocks.append(_deconv_block(geometry.channels[i], out_channels[i], padding))
    return nn.Sequential(*blocks)


class ConvEncoder(nn.Module):
    """Stride-2 Conv-BatchNorm-LeakyReLU blocks, then a linear layer to ``out_features``.

    Generalises the classic VanillaVAE encoder: the number of blocks and the flattened size follow
    from the image shape, so the same config serves 8x8, 28x28, 64x64 or non-square images.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        channels: Sequence[int],
        out_features: int,
        residual_blocks: int = 0,
    ):
        super().__init__()
        geometry = _ConvGeometry(image_shape, channels)
        self.image_shape = geometry.image_shape
        self.out_features = out_features
        self.blocks = _down_blocks(self.image_shape[0], geometry)
        self.residual = _residual_stack(geometry.channels[-1], residual_blocks)
        self.head = nn.Linear(geometry.flat_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.residual(self.blocks(x))  # (B, C_last, h_last, w_last)
        return self.head(features.flatten(1))


class ConvDecoder(nn.Module):
    """Mirror of :class:`ConvEncoder`: linear layer, transposed-conv blocks, 3x3 output conv.

    Each transposed convolution undoes one encoder block exactly (``output_padding`` is 1 where
    the encoder halved an even side and 0 where it rounded an odd side up), so the output has the
    input's height and width, whatever they are.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        channels: Sequence[int],
        latent_dim: int,
        residual_blocks: int = 0,
    ):
        super().__init__()
        geometry = _ConvGeometry(image_shape, channels)
        self.image_shape = geometry.image_shape
        self.latent_shape = (geometry.channels[-1], *geometry.sizes[-1])
        self.head = nn.Linear(latent_dim, geometry.flat_features)
        self.residual = _residual_stack(geometry.channels[-1], residual_blocks)
        self.blocks = _up_blocks(geometry)
        self.out = nn.Conv2d(geometry.channels[0], self.image_shape[0], kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        features = self.head(z).view(-1, *self.latent_shape)  # (B, C_last, h_last, w_last)
        return self.out(self.blocks(self.residual(features)))  # (B, C, H, W)


class ConvGridEncoder(nn.Module):
    """Images (B, C, H, W) to a grid of vectors (B, out_channels, h, w): :class:`ConvEncoder`'s
    stride-2 blocks, then a 1x1 convolution in place of its linear head, so each grid position
    keeps a vector of its own (a VQ-VAE's encoder).

    Attributes:
        grid_shape: (h, w), the sides the blocks leave: as many blocks as ``channels`` has while
            both sides stay >= ``min_size``.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        channels: Sequence[int],
        out_channels: int,
        min_size: int,
        residual_blocks: int = 0,
    ):
        super().__init__()
        geometry = _ConvGeometry(image_shape, channels, min_size)
        self.image_shape = geometry.image_shape
        self.grid_shape: tuple[int, int] = geometry.sizes[-1]
        self.blocks = _down_blocks(self.image_shape[0], geometry)
        self.residual = _residual_stack(geometry.channels[-1], residual_blocks)
        self.head = nn.Conv2d(geometry.channels[-1], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.residual(self.blocks(x)))  # (B, out_channels, h, w)


class ConvGridDecoder(nn.Module):
    """A grid of vectors (B, in_channels, h, w) to (B, C, H, W): a 3x3 Conv-BatchNorm-LeakyReLU
    to the deepest block's channels, then :class:`ConvDecoder`'s transposed-conv blocks and its
    3x3 output convolution."""

    def __init__(
        self,
        image_shape: Sequence[int],
        channels: Sequence[int],
        in_channels: int,
        min_size: int,
        residual_blocks: int = 0,
    ):
        super().__init__()
        geometry = _ConvGeometry(image_shape, channels, min_size)
        self.image_shape = geometry.image_shape
        self.head = nn.Sequential(
            nn.Conv2d(in_channels, geometry.channels[-1], kernel_size=3, padding=1),
            nn.BatchNorm2d(geometry.channels[-1]),
            nn.LeakyReLU(),
        )
        self.residual = _residual_stack(geometry.channels[-1], residual_blocks)
        self.blocks = _up_blocks(geometry)
        self.out = nn.Conv2d(geometry.channels[0], self.image_shape[0], kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.residual(self.head(z))))  # (B, C, H, W)


# ---------------------------------------------------------------------------------------------
# Network bodies: what ``model.network`` names. Each builds a matching encoder and decoder once
# the model knows the image shape and its code size.


class Network:
    """A network body: builds an encoder and a decoder of matching sizes for an image shape.

    Subclasses take their own sizes (hidden widths, channels) in the constructor and check them
    there, so a bad value fails when the config is built, naming its key.
    """

    def encoder(self, image_shape: Sequence[int], out_features: int) -> nn.Module:
        """An encoder from images (B, C, H, W) to (B, out_features)."""
        raise NotImplementedError

    def decoder(self, image_shape: Sequence[int], latent_dim: int) -> nn.Module:
        """A decoder from latents (B, latent_dim) to outputs (B, C, H, W)."""
        raise NotImplementedError

    # A conditional model (CVAE) feeds its encoder the image and a condition vector (a one-hot
    # label); how they go in together is the body's business. Its decoder takes the condition
    # appended to the latent, which every body's first (linear) layer takes as it is.

    def condition_shape(self, image_shape: Sequence[int], features: int) -> ImageShape:
        """The input shape of an encoder that takes images of ``image_shape`` with ``features``
        condition values each: here (C + features, H, W), the values as constant channels,
        which a body that takes images (a conv net) takes as it is."""
        c, h, w = _check_image_shape(image_shape)
        return (c + features, h, w)

    def add_condition(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Images x (B, C, H, W) and condition values (B, F) as one input of
        :meth:`condition_shape`: the values broadcast to channels, (B, C + F, H, W)."""
        b, _, h, w = x.shape
        channels = condition.to(x.dtype)[:, :, None, None].expand(b, -1, h, w)
        return torch.cat([x, channels], dim=1)

    def grid_encoder(
        self, image_shape: Sequence[int], out_channels: int, min_size: int
    ) -> nn.Module:
        """An encoder from images (B, C, H, W) to a grid of vectors (B, out_channels, h, w), its
        sides >= ``min_size``, with the grid's (h, w) as ``grid_shape`` (a VQ-VAE's encoder).
        Only bodies with a spatial layout have one."""
        raise ConfigError(
            allowed=f"{type(self).__name__} keeps no spatial grid of codes: a VQ-VAE needs a "
            "conv body (model/network=two_block_conv or conv)"
        )

    def grid_decoder(
        self, image_shape: Sequence[int], in_channels: int, min_size: int
    ) -> nn.Module:
        """A decoder from a grid (B, in_channels, h, w) of :meth:`grid_encoder`'s shape to outputs
        (B, C, H, W)."""
        raise ConfigError(
            allowed=f"{type(self).__name__} keeps no spatial grid of codes: a VQ-VAE needs a "
            "conv body (model/network=two_block_conv or conv)"
        )

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class _FlatInput(Network):
    """A body whose encoder flattens its input first: condition values are appended to the
    flat pixels (F more input features, not F more channels of H x W copies each)."""

    def condition_shape(self, image_shape: Sequence[int], features: int) -> ImageShape:
        """A one-row "image" of the C * H * W pixels and the ``features`` values:
        (1, 1, C * H * W + features)."""
        return (1, 1, math.prod(_check_image_shape(image_shape)) + features)

    def add_condition(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) and (B, F) -> (B, 1, 1, C * H * W + F)."""
        flat = torch.cat([x.flatten(1), condition.to(x.dtype)], dim=1)
        return flat[:, None, None, :]


class Linear(_FlatInput):
    """One affine map each way (no hidden layer): the linear autoencoder's body.

    Args:
        init_scale: factor on PyTorch's default initial weights (biases untouched). Gradient
            training removes an initial weight component along a direction of the data at a rate
            proportional to the data's variance there, so the default weights' random part in the
            hundreds of nearly constant pixel directions lingers for thousands of steps and keeps
            a linear AE well above PCA's error; small weights (0.01) start near the saddle at zero
            instead, which full-batch L-BFGS leaves along the principal directions. Must be > 0:
            at exactly zero the weights get no gradient.
    """

    def __init__(self, init_scale: float = 1.0):
        if not init_scale > 0:
            raise ConfigError("init_scale", init_scale, "must be > 0 (e.g. 1.0 or 0.01)")
        self.init_scale = float(init_scale)

    def encoder(self, image_shape: Sequence[int], out_features: int) -> MLPEncoder:
        encoder = MLPEncoder(image_shape, [], out_features)
        self._scale(encoder.net)
        return encoder

    def decoder(self, image_shape: Sequence[int], latent_dim: int) -> MLPDecoder:
        decoder = MLPDecoder(image_shape, [], latent_dim)
        self._scale(decoder.net)
        return decoder

    def _scale(self, layers: nn.Sequential) -> None:
        with torch.no_grad():
            layers[0].weight.mul_(self.init_scale)


class MLP(_FlatInput):
    """Fully connected layers with a nonlinearity between them.

    Args:
        hidden_dims: hidden widths from the image side; the decoder uses them in reverse.
        activation: ``relu`` or ``tanh`` (Burda et al. 2015's networks) between layers. The
            default is for run configs saved before the key existed; configs give it.
    """

    def __init__(self, hidden_dims: list[int], activation: str = "relu"):
        _check_sizes("hidden_dims", hidden_dims, non_empty=False)
        if activation not in ACTIVATIONS:
            raise ConfigError("activation", activation, f"must be one of {', '.join(ACTIVATIONS)}")
        self.hidden_dims = [int(h) for h in hidden_dims]
        self.activation = activation

    def encoder(self, image_shape: Sequence[int], out_features: int) -> MLPEncoder:
        return MLPEncoder(image_shape, self.hidden_dims, out_features, self.activation)

    def decoder(self, image_shape: Sequence[int], latent_dim: int) -> MLPDecoder:
        return MLPDecoder(image_shape, self.hidden_dims[::-1], latent_dim, self.activation)


class Conv(Network):
    """Stride-2 conv blocks down (:class:`ConvEncoder`) and transposed-conv blocks up
    (:class:`ConvDecoder`); as many blocks as the image size allows.

    Args:
        channels: block channels from the image side; blocks the image is too small for are
            dropped from the end. Images must be at least 3x3 (one block).
        residual_blocks: :class:`ResidualBlock` s at the deepest block's channels, after the
            encoder's stride-2 blocks and before the decoder's transposed ones (the VQ-VAE
            paper's two); 0, the default, for none. The default is for run configs saved
            before the key existed; configs give it.
    """

    def __init__(self, channels: list[int], residual_blocks: int = 0):
        _check_sizes("channels", channels, non_empty=True)
        if (
            not isinstance(residual_blocks, int)
            or isinstance(residual_blocks, bool)
            or residual_blocks < 0
        ):
            raise ConfigError("residual_blocks", residual_blocks, "must be an integer >= 0")
        self.channels = [int(c) for c in channels]
        self.residual_blocks = int(residual_blocks)

    def encoder(self, image_shape: Sequence[int], out_features: int) -> ConvEncoder:
        return ConvEncoder(image_shape, self.channels, out_features, self.residual_blocks)

    def decoder(self, image_shape: Sequence[int], latent_dim: int) -> ConvDecoder:
        return ConvDecoder(image_shape, self.channels, latent_dim, self.residual_blocks)

    def grid_encoder(
        self, image_shape: Sequence[int], out_channels: int, min_size: int
    ) -> ConvGridEncoder:
        return ConvGridEncoder(
            image_shape, self.channels, out_channels, min_size, self.residual_blocks
        )

    def grid_decoder(
        self, image_shape: Sequence[int], in_channels: int, min_size: int
    ) -> ConvGridDecoder:
        return ConvGridDecoder(
            image_shape, self.channels, in_channels, min_size, self.residual_blocks
        )
