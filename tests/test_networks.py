"""Encoder/decoder bodies: shapes derived from the data, for every size the data modules give."""

from __future__ import annotations

import pytest
import torch

from vae_experiments.models.networks import (
    MLP,
    Conv,
    Linear,
    ResidualBlock,
    conv_feature_sizes,
)
from vae_experiments.targets import ConfigError

CHANNELS = [32, 64, 128, 256, 512]


@pytest.mark.parametrize(
    "image_shape, expected_blocks",
    [
        ((1, 8, 8), 2),  # digits
        ((1, 28, 28), 4),  # MNIST, Fashion-MNIST
        ((3, 28, 28), 4),
        ((3, 64, 64), 5),  # CelebA-64: the classic VanillaVAE layout, 2x2 at the bottom
        ((1, 64, 64), 5),
        ((3, 128, 128), 5),  # CelebA-128: channels run out first, 4x4 at the bottom
        ((3, 48, 40), 5),  # non-square
        ((1, 20, 33), 4),  # odd, non-square
    ],
)
def test_conv_arch_returns_the_input_shape(image_shape, expected_blocks):
    latent_dim = 6
    network = Conv(CHANNELS)
    encoder = network.encoder(image_shape, 2 * latent_dim)
    decoder = network.decoder(image_shape, latent_dim)
    assert len(encoder.blocks) == expected_blocks
    assert len(decoder.blocks) == expected_blocks
    x = torch.rand(3, *image_shape)
    code = encoder(x)
    assert code.shape == (3, 2 * latent_dim)
    assert decoder(code[:, :latent_dim]).shape == x.shape


def test_feature_sizes_halve_with_ceiling():
    assert conv_feature_sizes(28, 28, 5) == [(28, 28), (14, 14), (7, 7), (4, 4), (2, 2)]
    assert conv_feature_sizes(64, 64, 5)[-1] == (2, 2)
    assert conv_feature_sizes(128, 128, 5)[-1] == (4, 4)


@pytest.mark.parametrize("network", [Linear(), MLP([64, 32])], ids=repr)
@pytest.mark.parametrize("image_shape", [(1, 8, 8), (3, 28, 20)])
def test_dense_archs_return_the_input_shape(network, image_shape):
    encoder, decoder = network.encoder(image_shape, 5), network.decoder(image_shape, 5)
    x = torch.rand(2, *image_shape)
    assert decoder(encoder(x)).shape == x.shape


def test_linear_arch_has_no_nonlinearity():
    encoder, decoder = Linear().encoder((1, 8, 8), 3), Linear().decoder((1, 8, 8), 3)
    modules = [type(m).__name__ for m in [*encoder.modules(), *decoder.modules()]]
    assert set(modules) <= {"MLPEncoder", "MLPDecoder", "Sequential", "Linear"}
    # An affine map: f(a x + (1-a) y) = a f(x) + (1-a) f(y).
    x, y = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(
        encoder(0.3 * x + 0.7 * y), 0.3 * encoder(x) + 0.7 * encoder(y), rtol=1e-5, atol=1e-5
    )


def test_mlp_decoder_mirrors_the_encoder():
    network = MLP([64, 32])
    encoder, decoder = network.encoder((1, 8, 8), 5), network.decoder((1, 8, 8), 5)
    assert [m.out_features for m in encoder.net if isinstance(m, torch.nn.Linear)] == [64, 32, 5]
    assert [m.out_features for m in decoder.net if isinstance(m, torch.nn.Linear)] == [32, 64, 64]


def test_too_small_image_for_conv_says_what_to_do():
    with pytest.raises(ConfigError, match="conv network cannot take images of shape.*network=mlp"):
        Conv(CHANNELS).encoder((1, 2, 2), 2)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: MLP([64, 0]), r"^hidden_dims=\[64, 0\] is invalid: must be a list of integers"),
        (lambda: Conv([]), r"^channels=\[\] is invalid: must be a non-empty list of integers"),
        (lambda: Conv([8, -1]), r"^channels=\[8, -1\] is invalid"),
        (lambda: Conv([8], residual_blocks=-1), r"^residual_blocks=-1 is invalid: must be an int"),
        (lambda: Conv([8], residual_blocks=1.5), r"^residual_blocks=1.5 is invalid"),
    ],
)
def test_bad_sizes_fail_with_their_argument(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


# --- residual blocks (the VQ-VAE paper's body) -------------------------------------------------


def test_a_residual_block_adds_relu_conv3_relu_conv1_to_its_input():
    torch.manual_seed(0)
    block = ResidualBlock(5)
    x = torch.randn(2, 5, 7, 6)
    conv3, conv1 = block.body[1], block.body[3]
    assert (conv3.kernel_size, conv1.kernel_size) == ((3, 3), (1, 1))
    h = torch.nn.functional.conv2d(x.relu(), conv3.weight, conv3.bias, padding=1)
    expected = x + torch.nn.functional.conv2d(h.relu(), conv1.weight, conv1.bias)
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("image_shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_residual_blocks_keep_every_conv_shape(image_shape):
    network = Conv([16, 16], residual_blocks=2)
    x = torch.rand(2, *image_shape)
    encoder, decoder = network.encoder(image_shape, 6), network.decoder(image_shape, 3)
    assert len(encoder.residual) == len(decoder.residual) == 2
    assert decoder(encoder(x)[:, :3]).shape == x.shape
    grid_encoder = network.grid_encoder(image_shape, 4, min_size=4)
    grid_decoder = network.grid_decoder(image_shape, 4, min_size=4)
    grid = grid_encoder(x)
    assert grid.shape == (2, 4, *grid_encoder.grid_shape)
    assert grid_decoder(grid).shape == x.shape
    assert all(
        isinstance(b, ResidualBlock) for b in [*grid_encoder.residual, *grid_decoder.residual]
    )


def test_no_residual_blocks_leave_the_weights_as_they_were():
    """residual_blocks=0 (the default) adds no parameter: checkpoints saved before the option
    load as they are."""
    for build in ("encoder", "decoder", "grid_encoder", "grid_decoder"):
        args = (6, 4) if build.startswith("grid") else (6,)
        keys = getattr(Conv([8, 16]), build)((1, 28, 28), *args).state_dict()
        assert not any(key.startswith("residual") for key in keys)
