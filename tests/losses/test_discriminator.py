import pytest
import torch

from tokenizers_vis.losses import PatchGANDiscriminator, TiTokDiscriminator, build_discriminator
from tokenizers_vis.losses.discriminator import BlurDownsample


@pytest.mark.parametrize("size", [32, 64, 128])
def test_titok_discriminator_small_width_output_shape(size):
    disc = TiTokDiscriminator(base_channels=16, num_groups=4)
    images = torch.rand(2, 3, size, size, requires_grad=True)
    logits = disc(images)
    # Adaptive max-pool fixes the grid whatever the input size.
    assert logits.shape == (2, 1, 16, 16)
    logits.mean().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_titok_discriminator_default_width():
    disc = TiTokDiscriminator()
    widths = [m.out_channels for m in disc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths == [128, 128, 256, 512, 512, 1]
    num_params = sum(p.numel() for p in disc.parameters())
    # 5x5 stem + 3 conv3x3 stages + 1x1 and 5x5 heads at 128/256/512 channels: about 1.9M.
    assert 1.5e6 < num_params < 2.5e6
    assert disc(torch.rand(1, 3, 64, 64)).shape == (1, 1, 16, 16)


def test_titok_discriminator_validates_groups():
    with pytest.raises(ValueError, match="divide"):
        TiTokDiscriminator(base_channels=16, num_groups=32)


def test_blur_downsample_halves_and_preserves_constants():
    blur = BlurDownsample(3)
    out = blur(torch.ones(1, 3, 16, 16))
    assert out.shape == (1, 3, 8, 8)
    # Normalised taps: a constant stays constant away from the zero-padded border.
    assert torch.allclose(out[..., 1:-1, 1:-1], torch.ones(1, 3, 6, 6))
    assert "kernel" not in blur.state_dict()


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_patchgan_output_shape(norm):
    disc = PatchGANDiscriminator(base_channels=16, num_layers=3, norm=norm, num_groups=8)
    # 64 -> 32 -> 16 -> 8 (stride-2 layers), then two 4x4 stride-1 layers: 7 -> 6.
    assert disc(torch.rand(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_patchgan_validates_norm():
    with pytest.raises(ValueError, match="norm"):
        PatchGANDiscriminator(norm="layer")


def test_build_discriminator_by_name():
    assert isinstance(build_discriminator("titok", base_channels=16, num_groups=8), TiTokDiscriminator)
    assert isinstance(build_discriminator("patchgan", base_channels=16), PatchGANDiscriminator)
    with pytest.raises(ValueError, match="known: patchgan, titok"):
        build_discriminator("stylegan")
