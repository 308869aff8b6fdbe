"""The VQGAN tokenizer (the MaskGIT-VQGAN teacher of TiTok's two-stage recipe) and its loaders."""

import pytest
import torch

from tokenizers_vis import load_tokenizer, save_pretrained
from tokenizers_vis.models import TiTok
from tokenizers_vis.models.vqgan import (
    VQGAN,
    config_from_maskgit_state,
    load_vqgan,
    maskgit_state_dict,
    save_maskgit_vqgan,
)
from tokenizers_vis.nn.cnn import ConvEncoder

# 32 px, two downsamplings -> an 8 x 8 grid of 48 codes.
TINY = dict(image_size=32, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=16,
            codebook_size=48)


def randomized(model, seed=0):
    """Non-trivial values in every tensor, so that a weight left behind by a loader shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) / max(1, param[0].numel()) ** 0.5)
    return model.eval()


def test_shapes_and_api():
    vqgan = randomized(VQGAN(**TINY))
    x = torch.rand(3, 3, 32, 32)
    encoded = vqgan.encode(x)
    assert vqgan.grid_size == 8 and vqgan.num_tokens == 64
    assert encoded.ids.shape == (3, 64) and encoded.latents.shape == (3, 64, 16) and encoded.extras["grid"] == (8, 8)
    assert 0 <= encoded.ids.min() and encoded.ids.max() < 48
    torch.testing.assert_close(vqgan.decode(encoded.ids), vqgan.decode(encoded), atol=1e-5, rtol=1e-5)
    assert torch.equal(vqgan.code_grid(x), encoded.ids.reshape(3, 8, 8))
    out = vqgan(x)
    assert out.reconstruction.shape == x.shape and out.aux_loss.ndim == 0
    assert 0 <= vqgan.reconstruct(x).min() and vqgan.reconstruct(x).max() <= 1
    with pytest.raises(ValueError, match="expects 32x32"):
        vqgan.encode(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="divisible by the downsampling factor"):
        VQGAN(**{**TINY, "image_size": 34})


def test_defaults_are_the_maskgit_vqgan():
    """16x16 grid of 1024 x 256 codes at 256 px; the decoder is the 30.5M-parameter TiTok pixel decoder."""
    with torch.device("meta"):
        vqgan = VQGAN()
    assert (vqgan.grid_size, vqgan.codebook_size, vqgan.quantize.dim) == (16, 1024, 256)
    assert sum(p.numel() for p in vqgan.decoder.parameters()) == 30_478_339
    assert not vqgan.quantize.use_l2_norm


def test_encoder_uses_the_maskgit_shortcut():
    """MaskGIT-VQGAN's encoder blocks use the decoder's residual quirk: an (out, out) 1x1 shortcut
    on the block output where the width changes."""
    encoder = ConvEncoder(z_channels=16, base_channels=32, channel_mult=(1, 2), num_res_blocks=1)
    assert encoder.down[1].block[0].maskgit_shortcut
    assert encoder.down[1].block[0].nin_shortcut.weight.shape == (64, 64, 1, 1)
    assert encoder.down[0].block[0].nin_shortcut is None


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_official_layout_file_round_trip(suffix, tmp_path):
    source = randomized(VQGAN(**TINY))
    path = save_maskgit_vqgan(source, tmp_path / f"maskgit-vqgan{suffix}")
    loaded = load_vqgan(path, image_size=32)
    assert isinstance(loaded, VQGAN) and not loaded.training
    assert {k: v for k, v in loaded.config.items() if k in TINY} == {**TINY, "channel_mult": [1, 2, 2]}
    for name, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.encode(x).ids, source.encode(x).ids)


def test_official_layout_names_every_tensor():
    """The layout of the official state dict: encoder.*, quantize.embedding.weight, decoder.*."""
    state = maskgit_state_dict(VQGAN(**TINY))
    assert {key.split(".")[0] for key in state} == {"encoder", "quantize", "decoder"}
    assert "quantize.embedding.weight" in state and "encoder.down.1.block.0.nin_shortcut.weight" in state
    assert "decoder.up.1.upsample_conv.weight" in state and "encoder.conv_in.bias" not in state
    config = config_from_maskgit_state(state, image_size=32)
    assert config["channel_mult"] == [1, 2, 2] and config["num_res_blocks"] == 1


def test_broken_official_files_raise_clear_errors(tmp_path):
    state = maskgit_state_dict(VQGAN(**TINY))
    torch.save({k: v for k, v in state.items() if not k.startswith("encoder.conv_in")}, tmp_path / "a.bin")
    with pytest.raises(ValueError, match="not a MaskGIT-VQGAN state dict"):
        load_vqgan(tmp_path / "a.bin")
    torch.save({k: v for k, v in state.items() if k != "decoder.conv_out.bias"}, tmp_path / "b.bin")
    with pytest.raises(ValueError, match="do not match"):
        load_vqgan(tmp_path / "b.bin", image_size=32)


def test_our_folder_and_checkpoint_formats_load_as_teachers(tmp_path):
    source = randomized(VQGAN(**TINY))
    save_pretrained(source, tmp_path / "teacher")
    assert isinstance(load_tokenizer(tmp_path / "teacher"), VQGAN)
    loaded = load_vqgan(tmp_path / "teacher")
    for name, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    with pytest.raises(ValueError, match="for 32 px images, not 64"):
        load_vqgan(tmp_path / "teacher", image_size=64)
    titok = TiTok(image_size=32, patch_size=8, num_latent_tokens=4, encoder_size=None, decoder_size=None,
                  encoder_width=32, encoder_depth=1, encoder_heads=2, decoder_width=32, decoder_depth=1,
                  decoder_heads=2, codebook_size=16)
    save_pretrained(titok, tmp_path / "titok")
    with pytest.raises(ValueError, match="not a VQGAN"):
        load_vqgan(tmp_path / "titok")
