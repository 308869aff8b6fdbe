import json

import pytest
import torch

from tokenizers_vis import build_tokenizer, load_tokenizer, save_pretrained
from tokenizers_vis.models import TiTok

TINY = dict(image_size=32, patch_size=8, num_latent_tokens=8, encoder_size=None, decoder_size=None,
            encoder_width=32, encoder_depth=1, encoder_heads=2, decoder_width=48, decoder_depth=2, decoder_heads=3)

VARIANTS = {
    "vq_l2": dict(quantizer="vq", token_dim=12, codebook_size=64, use_l2_norm=True),
    "vq": dict(quantizer="vq", token_dim=16, codebook_size=128, use_l2_norm=False),
    "vae": dict(quantizer="vae", token_dim=16),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_shapes_and_api(variant):
    tok = TiTok(**TINY, **VARIANTS[variant]).eval()
    x = torch.rand(3, 3, 32, 32)
    encoded = tok.encode(x)
    dim = VARIANTS[variant]["token_dim"]
    assert encoded.latents.shape == (3, 8, dim)
    out = tok(x)
    assert out.reconstruction.shape == x.shape and out.aux_loss.ndim == 0
    if variant == "vae":
        assert encoded.ids is None
        torch.testing.assert_close(tok.decode(encoded.latents), tok.decode(encoded))
    else:
        assert encoded.ids.shape == (3, 8) and encoded.ids.dtype == torch.long
        assert 0 <= encoded.ids.min() and encoded.ids.max() < tok.codebook_size
        torch.testing.assert_close(tok.decode(encoded.ids), tok.decode(encoded), atol=1e-5, rtol=1e-5)
    assert tok.reconstruct(x).min() >= 0 and tok.reconstruct(x).max() <= 1


def test_bad_inputs_raise_clear_errors():
    tok = TiTok(**TINY, **VARIANTS["vq_l2"]).eval()
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        tok.encode(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        tok.encode(torch.rand(1, 3, 30, 30))
    with pytest.raises(ValueError, match="expects 32x32"):
        tok.encode(torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="lie in \\[0, 63\\]"):
        tok.decode(torch.full((1, 8), 64, dtype=torch.long))
    with pytest.raises(ValueError, match="expected 8 tokens"):
        tok.decode(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible by patch_size"):
        TiTok(**{**TINY, "image_size": 36})
    vae = TiTok(**TINY, **VARIANTS["vae"])
    with pytest.raises(ValueError, match="continuous"):
        vae.decode(torch.zeros(1, 8, dtype=torch.long))


def test_legacy_reshape_changes_the_token_layout():
    torch.manual_seed(0)
    a = TiTok(**TINY, **VARIANTS["vq"]).eval()
    b = TiTok(**TINY, **VARIANTS["vq"], legacy_reshape=True).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 3, 32, 32)
    assert not torch.allclose(a.encode(x).extras["pre_quant"], b.encode(x).extras["pre_quant"])


def test_save_load_round_trip_is_exact(tmp_path):
    tok = TiTok(**TINY, **VARIANTS["vq_l2"]).eval()
    x = torch.rand(2, 3, 32, 32)
    save_pretrained(tok, tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert config["model_type"] == "titok" and config["decoder_width"] == 48
    loaded = load_tokenizer(tmp_path / "tok")
    assert not loaded.training
    assert torch.equal(loaded.encode(x).ids, tok.encode(x).ids)
    torch.testing.assert_close(loaded.reconstruct(x), tok.reconstruct(x), atol=0, rtol=0)
    rebuilt = build_tokenizer(tok.config)
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in tok.parameters())


# Released one-stage variants and the official parameter counts per top-level prefix
# (shared/reference/titok/full_size_keys.json, from the official implementation).
RELEASED = {
    "titok_bl64_vq8k": dict(num_latent_tokens=64, encoder_size="base", decoder_size="large", token_dim=64,
                            codebook_size=8192, use_l2_norm=False),
    "titok_bl128_vq8k": dict(num_latent_tokens=128, encoder_size="base", decoder_size="large", token_dim=64,
                             codebook_size=8192, use_l2_norm=False),
    "titok_sl256_vq8k": dict(num_latent_tokens=256, encoder_size="small", decoder_size="large", token_dim=64,
                             codebook_size=8192, use_l2_norm=False),
    "titok_ll32_vae_c16": dict(num_latent_tokens=32, encoder_size="large", decoder_size="large", quantizer="vae",
                               token_dim=16),
    "titok_bl64_vae_c16": dict(num_latent_tokens=64, encoder_size="base", decoder_size="large", quantizer="vae",
                               token_dim=16),
    "titok_bl128_vae_c16": dict(num_latent_tokens=128, encoder_size="base", decoder_size="large", quantizer="vae",
                                token_dim=16),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_full_size_parameter_counts_match_the_released_models(name, shared_dir):
    counts = json.loads((shared_dir / "reference/titok/full_size_keys.json").read_text())["_param_counts"][name]
    with torch.device("meta"):
        tok = TiTok(image_size=256, patch_size=16, **RELEASED[name])
    ours: dict[str, int] = {}
    for key, param in tok.named_parameters():
        ours[key.split(".")[0]] = ours.get(key.split(".")[0], 0) + param.numel()
    assert ours == {k: v for k, v in counts.items() if k != "_total"}
