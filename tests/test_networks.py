"""Encoder/decoder bodies: shapes derived from the data, for every size the data modules give."""

from __future__ import annotations

import pytest
import torch

from vae_experiments.models.networks import MLP, Conv, Linear, conv_feature_sizes
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
    ],
)
def test_bad_sizes_fail_with_their_argument(build, message):
    with pytest.raises(ConfigError, match=message):
        build()
