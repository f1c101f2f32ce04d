"""Encoder/decoder bodies: shapes derived from the data, for every size the data modules give."""

from __future__ import annotations

import pytest
import torch

from vae_experiments.models.networks import build_encoder_decoder, conv_feature_sizes

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
    encoder, decoder = build_encoder_decoder(
        "conv", image_shape, latent_dim, 2 * latent_dim, conv_channels=CHANNELS
    )
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


@pytest.mark.parametrize("arch", ["linear", "mlp"])
@pytest.mark.parametrize("image_shape", [(1, 8, 8), (3, 28, 20)])
def test_dense_archs_return_the_input_shape(arch, image_shape):
    encoder, decoder = build_encoder_decoder(arch, image_shape, 5, 5, hidden_dims=[64, 32])
    x = torch.rand(2, *image_shape)
    assert decoder(encoder(x)).shape == x.shape


def test_linear_arch_has_no_nonlinearity():
    encoder, decoder = build_encoder_decoder("linear", (1, 8, 8), 3, 3)
    modules = [type(m).__name__ for m in [*encoder.modules(), *decoder.modules()]]
    assert set(modules) <= {"MLPEncoder", "MLPDecoder", "Sequential", "Linear"}
    # An affine map: f(a x + (1-a) y) = a f(x) + (1-a) f(y).
    x, y = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(
        encoder(0.3 * x + 0.7 * y), 0.3 * encoder(x) + 0.7 * encoder(y), rtol=1e-5, atol=1e-5
    )


def test_too_small_image_for_conv_says_what_to_do():
    with pytest.raises(ValueError, match="too small for the conv arch.*model.arch=mlp"):
        build_encoder_decoder("conv", (1, 2, 2), 2, 2, conv_channels=CHANNELS)


def test_unknown_arch_lists_choices():
    with pytest.raises(ValueError, match="linear, mlp, conv"):
        build_encoder_decoder("resnet", (1, 8, 8), 2, 2)


def test_bad_latent_dim():
    with pytest.raises(ValueError, match="model.latent_dim must be >= 1"):
        build_encoder_decoder("mlp", (1, 8, 8), 0, 0, hidden_dims=[8])
