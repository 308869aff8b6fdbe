"""The taming / LlamaGen VQGAN encoder and decoder (TokenFlow's pixel branch), against the official
fixtures (../shared/reference/tokenflow): strict loads under the official names, outputs, and the
names and shapes of the full-size released models."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import reference_path
from safetensors.torch import load_file

from tokenizers_vis.nn.cnn import AttnBlock, Downsample, ResBlock, VQGANDecoder, VQGANEncoder

# Sizes of each fixture (README table): encoder ch / decoder ch, ch_mult, decoder res-blocks.
FIXTURES = {
    "tiny_clipb": dict(ch_mult=(1, 1, 2), decoder_ch=32, decoder_blocks=2),
    "tiny_clipb_enhanced": dict(ch_mult=(1, 1, 1), decoder_ch=64, decoder_blocks=4),
    "tiny_siglip": dict(ch_mult=(1, 1, 1, 1, 1), decoder_ch=32, decoder_blocks=2),
}
# Full-size models: standard decoder ch 128 / 2 blocks; enhanced ch 256 / 4 blocks.
FULL_SIZE = {
    "tokenflow_clipb_32k_enhanced": dict(decoder_ch=256, decoder_blocks=4),
    "tokenflow_siglip_32k": dict(decoder_ch=128, decoder_blocks=2),
    "tokenflow_clipb_32k_stage1": dict(decoder_ch=128, decoder_blocks=2),
}


def reference_dir(shared_dir):
    return reference_path(shared_dir, "tokenflow")


def sub_state_dict(tensors, prefix):
    prefix = f"state_dict.{prefix}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def build_pair(ch, ch_mult, z_channels, decoder_ch, decoder_blocks):
    encoder = VQGANEncoder(ch=ch, ch_mult=ch_mult, num_res_blocks=2, z_channels=z_channels)
    decoder = VQGANDecoder(z_channels=z_channels, ch=decoder_ch, ch_mult=ch_mult, num_res_blocks=decoder_blocks)
    return encoder, decoder


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", FIXTURES)
def test_loads_official_pixel_branch_strictly_and_reproduces_it(shared_dir, name):
    t = load_file(str(reference_dir(shared_dir) / f"{name}.safetensors"))
    encoder, decoder = build_pair(32, z_channels=32, **FIXTURES[name])
    # Strict: the official names load with no mapping, no missing and no unexpected keys.
    encoder.load_state_dict(sub_state_dict(t, "encoder"))
    decoder.load_state_dict(sub_state_dict(t, "decoder"))
    encoder.eval(), decoder.eval()
    # SigLIP's pixel branch runs on a bicubic upscale of the input, stored as encode.pix_input.
    images = t.get("io.encode.pix_input", t["io.input.images"])
    # SigLIP's decode resizes to 384 afterwards; pix_decoder_out is the decoder's own output.
    pixels = t.get("io.decode.pix_decoder_out", t["io.decode.pix"])
    with torch.no_grad():
        assert max_diff(encoder(images), t["io.encode.pix_encoder_out"]) < 2e-5
        assert max_diff(decoder(t["io.decode.pix_post_quant"]), pixels) < 5e-5


@pytest.mark.parametrize("name", FULL_SIZE)
def test_names_and_shapes_equal_the_full_size_models(shared_dir, name):
    keys = json.loads((reference_dir(shared_dir) / "full_size_keys.json").read_text())[name]
    with torch.device("meta"):  # shapes only: the full decoders are ~100M parameters
        encoder, decoder = build_pair(128, (1, 1, 2, 2, 4), 256, **FULL_SIZE[name])
    for prefix, module in (("encoder", encoder), ("decoder", decoder)):
        ours = {f"{prefix}.{k}": list(v.shape) for k, v in module.state_dict().items()}
        official = {k: v for k, v in keys.items() if k.startswith(f"{prefix}.")}
        assert ours == official


def test_attention_is_single_head_over_positions():
    block = AttnBlock(32, norm_groups=8).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 32, 3, 5)
    # The official formulation: bmm of (B, N, C) queries with (B, C, N) keys, softmax over keys.
    h = block.norm(x)
    q = block.q(h).flatten(2).transpose(1, 2)
    k = block.k(h).flatten(2)
    v = block.v(h).flatten(2)
    weights = torch.softmax(torch.bmm(q, k) * 32 ** -0.5, dim=2)
    out = torch.bmm(v, weights.transpose(1, 2)).reshape(2, 32, 3, 5)
    torch.testing.assert_close(block(x), x + block.proj_out(out), atol=1e-5, rtol=0)


def test_downsample_pads_right_and_bottom_only():
    down = Downsample(4)
    x = torch.randn(1, 4, 8, 8)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    assert down(x).shape == (1, 4, 4, 4)
    torch.testing.assert_close(down(x), expected, atol=0, rtol=0)
    # Symmetric padding would give a different result: the test above can tell them apart.
    symmetric = F.conv2d(x, down.conv.weight, down.conv.bias, stride=2, padding=1)
    assert max_diff(symmetric, expected) > 1e-3


def test_resblock_bias_option():
    plain = ResBlock(8, 16, norm_groups=4)
    biased = ResBlock(8, 16, norm_groups=4, bias=True)
    assert plain.conv1.bias is None and plain.nin_shortcut.bias is None
    assert biased.conv1.bias.shape == (16,) and biased.conv2.bias.shape == (16,)
    assert biased.nin_shortcut.bias.shape == (16,) and biased.nin_shortcut.weight.shape == (16, 8, 1, 1)


def test_encoder_decoder_shapes():
    encoder, decoder = build_pair(32, (1, 2, 2), 8, decoder_ch=32, decoder_blocks=1)
    z = encoder(torch.randn(2, 3, 16, 24))
    assert z.shape == (2, 8, 4, 6)
    assert decoder(z).shape == (2, 3, 16, 24)
