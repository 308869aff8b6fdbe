import json

import pytest
import torch
import torch.nn.functional as F

from tokenizers_vis.nn.cnn import ConvDecoder, ConvEncoder, ResBlock

TINY = dict(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1)


def test_decoder_upsamples_by_two_per_level():
    decoder = ConvDecoder(z_channels=16, **TINY).eval()
    assert decoder(torch.randn(2, 16, 5, 7)).shape == (2, 3, 20, 28)


def test_encoder_mirrors_the_decoder_shapes():
    encoder = ConvEncoder(z_channels=16, **TINY).eval()
    z = encoder(torch.rand(2, 3, 32, 24))
    assert z.shape == (2, 16, 8, 6)
    assert ConvDecoder(z_channels=16, **TINY)(z).shape == (2, 3, 32, 24)


def _residual_branch(block: ResBlock, x: torch.Tensor) -> torch.Tensor:
    h = block.conv1(F.silu(block.norm1(x)))
    return block.conv2(F.silu(block.norm2(h)))


def test_maskgit_shortcut_acts_on_the_block_output_and_drops_the_input():
    block = ResBlock(64, 32, maskgit_shortcut=True).eval()
    assert block.nin_shortcut.weight.shape == (32, 32, 1, 1) and block.nin_shortcut.bias is None
    x = torch.randn(2, 64, 6, 6)
    h = _residual_branch(block, x)
    torch.testing.assert_close(block(x), h + block.nin_shortcut(h), atol=0, rtol=0)


def test_standard_shortcut_acts_on_the_input():
    block = ResBlock(64, 32, maskgit_shortcut=False).eval()
    assert block.nin_shortcut.weight.shape == (32, 64, 1, 1)
    x = torch.randn(2, 64, 6, 6)
    torch.testing.assert_close(block(x), _residual_branch(block, x) + block.nin_shortcut(x), atol=0, rtol=0)


@pytest.mark.parametrize("maskgit_shortcut", [True, False])
def test_equal_channels_add_the_input(maskgit_shortcut):
    block = ResBlock(32, 32, maskgit_shortcut=maskgit_shortcut).eval()
    assert block.nin_shortcut is None
    x = torch.randn(1, 32, 4, 4)
    torch.testing.assert_close(block(x), _residual_branch(block, x) + x, atol=0, rtol=0)


def test_block_convs_have_no_bias_and_groupnorm_matches_maskgit():
    block = ResBlock(64, 64)
    assert block.conv1.bias is None and block.conv2.bias is None
    assert (block.norm1.num_groups, block.norm1.eps) == (32, 1e-6)


def test_default_decoder_is_the_released_titok_pixel_decoder(shared_dir):
    """Names, shapes and order of `pixel_decoder.*` in the released TiTok-L-32 (30.5M parameters)."""
    keys = json.loads((shared_dir / "reference/titok/full_size_keys.json").read_text())["titok_l32"]
    official = {k[len("pixel_decoder."):]: v for k, v in keys.items() if k.startswith("pixel_decoder.")}
    with torch.device("meta"):
        decoder = ConvDecoder()
    assert [(k, list(v.shape)) for k, v in decoder.state_dict().items()] == list(official.items())
    assert sum(p.numel() for p in decoder.parameters()) == 30_478_339
