"""FlexTok: API, nested dropout, guidance, training pass, config round trip (tiny, pixel patches)."""

import warnings

import pytest
import torch

from tokenizers_vis.models import FlexTok, build_tokenizer

# Tiny models on 8 x 8 patches: too narrow for clean decodes, which these tests do not need.
pytestmark = pytest.mark.filterwarnings("ignore:FlexTok patches hold")

TINY = dict(image_size=32, vae=None, patch_size=8, num_registers=8, encoder_width=32, encoder_depth=1,
            encoder_heads=2, decoder_width=32, decoder_depth=2, decoder_heads=2, sample_steps=2, guidance_scale=1.0)
TINY_VAE = {"pretrained": None, "scaling_factor": 0.5,
            "config": {"block_out_channels": [8, 8], "norm_num_groups": 4, "latent_channels": 4,
                       "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
                       "layers_per_block": 1}}


def _randomise_zero_init(tok):
    # adaLN-zero starts at the identity and the register head at zero (one code for every image);
    # random values make the image and the conditioning visible to the tests.
    with torch.no_grad():
        for name, p in tok.named_parameters():
            if "modulation" in name or "head.proj" in name or name.startswith("encoder.head"):
                p.normal_(0, 0.2)


@pytest.fixture
def tok():
    model = FlexTok(**TINY).eval()
    _randomise_zero_init(model)
    return model


def test_encode_decode_shapes_and_ranges(tok):
    x = torch.rand(2, 3, 32, 32)
    encoded = tok.encode(x)
    assert encoded.ids.shape == (2, 8) and encoded.ids.dtype == torch.int64
    assert encoded.latents.shape == (2, 8, 6)
    assert 0 <= int(encoded.ids.min()) and int(encoded.ids.max()) < 64000 == tok.codebook_size
    out = tok.decode(encoded)
    assert out.shape == x.shape
    # Default decode is seeded: validation and export round trips are reproducible.
    assert torch.equal(out, tok.decode(encoded))
    assert torch.equal(tok.decode(encoded.ids[:, :3]), tok.decode(encoded, num_tokens=3))


@pytest.mark.parametrize("k", [0, 9, -1])
def test_wrong_number_of_tokens_is_a_value_error(tok, k):
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="num_tokens"):
        tok.decode(ids, num_tokens=k)


def test_too_few_ids_or_bad_noise_is_a_value_error(tok):
    with pytest.raises(ValueError, match="at least 4"):
        tok.decode(torch.zeros(1, 2, dtype=torch.long), num_tokens=4)
    with pytest.raises(ValueError, match="noise must have shape"):
        tok.decode(torch.zeros(1, 8, dtype=torch.long), noise=torch.zeros(1, 3, 40, 40))
    with pytest.raises(ValueError, match="vae_noise"):
        tok.encode(torch.rand(1, 3, 32, 32), vae_noise=torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("k", [1, 3, 8])
def test_nested_dropout_ignores_ids_beyond_k(tok, k):
    ids = torch.randint(0, 64000, (2, 8))
    changed = ids.clone()
    changed[:, k:] = torch.randint(0, 64000, (2, 8 - k))
    noise = torch.randn(2, 3, 32, 32)
    a = tok.decode(ids, num_tokens=k, noise=noise, guidance=2.0)
    b = tok.decode(changed, num_tokens=k, noise=noise, guidance=2.0)
    assert torch.equal(a, b)
    if k < 8:
        changed[:, :k] = (ids[:, :k] + 1) % 64000
        assert not torch.allclose(a, tok.decode(changed, num_tokens=k, noise=noise, guidance=2.0))


def test_guidance_one_is_the_conditional_output_and_guidance_changes_it(tok):
    ids = torch.randint(0, 64000, (2, 8))
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    cond = tok.decode(ids, guidance=1.0, generator=generator())
    noise = tok.initial_noise(2, generator(), "cpu")
    manual = tok.to_images(_euler_conditional(tok, ids, noise, steps=2))
    torch.testing.assert_close(cond, manual)
    assert not torch.allclose(cond, tok.decode(ids, guidance=3.0, generator=generator()))
    assert not torch.allclose(tok.decode(ids, guidance=3.0, generator=generator()),
                              tok.decode(ids, guidance=3.0, apg=True, generator=generator()))


def _euler_conditional(tok, ids, noise, steps):
    cond = tok.decoder.condition(tok.quantize.embed(ids), torch.full((ids.shape[0],), ids.shape[1]))
    x = noise
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((ids.shape[0],), 1 - i / steps)
            x = x - tok.decoder(x, t, cond)[0] / steps
    return x


def test_training_pass_reaches_every_trained_part(tok):
    tok.train()
    x = torch.rand(4, 3, 32, 32)
    output = tok(x)
    assert output.reconstruction.shape == x.shape and output.aux_loss.ndim == 0
    output.aux_loss.backward()
    for name in ("encoder.registers", "encoder.head.weight", "decoder.token_embed.weight",
                 "decoder.transformer.blocks.0.modulation.weight", "decoder.head.proj.weight"):
        grad = dict(tok.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("mode,allowed", [("pow2", {1, 2, 4, 8}), ("uniform_pow2", {1, 2, 4, 8}),
                                          ("uniform", set(range(1, 9))), ("none", {8})])
def test_nested_dropout_modes(mode, allowed):
    model = FlexTok(**{**TINY, "nested_dropout": mode})
    keep = model.sample_keep(2000)
    assert set(keep.tolist()) == allowed


def test_config_round_trip_rebuilds_the_same_model(tok):
    again = build_tokenizer(tok.config)
    again.load_state_dict(tok.state_dict(), strict=True)
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(again.eval().encode(x).ids, tok.encode(x).ids)
    assert all(not k.endswith("pos_embed") or "register" in k for k in tok.state_dict())


def test_tiny_vae_stage_and_loading_it_from_a_local_folder(tmp_path):
    from tokenizers_vis.nn.pretrained import FrozenVAE
    from tokenizers_vis.nn.weights import MissingWeightsError

    model = FlexTok(**{**TINY, "vae": TINY_VAE, "patch_size": 2}).eval()
    assert model.latent_size == 16 and model.latent_channels == 4
    x = torch.rand(2, 3, 32, 32)
    noise = torch.randn(2, 4, 16, 16)
    mean = model.to_latents(x)
    assert not torch.allclose(mean, model.to_latents(x, noise))
    assert model.encode(x, vae_noise=noise).ids.shape == (2, 8)
    assert model.decode(model.encode(x), num_tokens=2).shape == x.shape
    assert not any(p.requires_grad for p in model.vae.parameters())
    model.train()
    assert not model.vae.training
    model.vae.model.save_pretrained(tmp_path / "vae")
    loaded = FrozenVAE(pretrained=str(tmp_path / "vae"), scaling_factor=0.5)
    torch.testing.assert_close(loaded.encode(x * 2 - 1), model.vae.encode(x * 2 - 1))
    with pytest.raises(MissingWeightsError, match="vae.pretrained"):
        FrozenVAE(pretrained=str(tmp_path / "missing"))


def test_saved_flextok_rebuilds_its_vae_from_its_own_weights(tmp_path):
    """The VAE's source (here a local folder, normally a Hub id) is not needed to load a saved
    FlexTok: the config records the VAE's architecture and the weights travel with the model."""
    import json
    import shutil

    from tokenizers_vis import load_tokenizer, save_pretrained
    from tokenizers_vis.nn.pretrained import FrozenVAE

    FrozenVAE(config=TINY_VAE["config"]).model.save_pretrained(tmp_path / "vae")
    model = FlexTok(**{**TINY, "vae": {"pretrained": str(tmp_path / "vae"), "scaling_factor": 0.5},
                       "patch_size": 2}).eval()
    _randomise_zero_init(model)
    saved = save_pretrained(model, tmp_path / "tok")
    shutil.rmtree(tmp_path / "vae")  # as offline: the source is gone
    recorded = json.loads((saved / "config.json").read_text())["vae"]
    assert recorded["pretrained"] is None and recorded["scaling_factor"] == 0.5
    assert recorded["config"]["block_out_channels"] == [8, 8] and recorded["config"]["latent_channels"] == 4
    loaded = load_tokenizer(saved)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    x = torch.rand(2, 3, 32, 32)
    encoded = model.encode(x)
    assert torch.equal(loaded.encode(x).ids, encoded.ids)
    torch.testing.assert_close(loaded.decode(encoded, num_tokens=3), model.decode(encoded, num_tokens=3))


def _register_features(tok, images):
    """The encoder's normalised register outputs (what the zero-initialised head reads)."""
    enc = tok.encoder
    with torch.no_grad():
        x = enc.patch_embed(tok.to_latents(images)) + enc.pos_embed
        x = torch.cat([x, enc.registers.expand(images.shape[0], -1, -1)], dim=1)
        return enc.norm(enc.transformer(x, enc.mask))[:, -enc.num_registers:]


def test_initial_registers_depend_on_the_image_and_the_codes_start_unsaturated():
    """The init that lets the demo learn: with the ViT std (0.02) a patch embedding is ~10x smaller
    than its sin-cos position, so every image gives nearly the same registers (and codes), and
    the decoder learns to ignore them. Measured spread across images / overall: ~0.45 vs ~0.045."""
    smooth = torch.nn.functional.interpolate(torch.rand(8, 3, 4, 4), size=32, mode="bilinear")
    spread = {}
    for init in ("xavier", "trunc_normal"):
        torch.manual_seed(0)
        tok = FlexTok(**{**TINY, "linear_init": init}).eval()
        h = _register_features(tok, smooth)
        spread[init] = float(h.std(0).mean() / h.std())
    assert spread["xavier"] > 0.25 > 0.1 > spread["trunc_normal"], spread
    # Zero-initialised register head: FSQ inputs at 0, where tanh's slope is largest.
    tok = FlexTok(**TINY)
    assert not tok.encoder.head.weight.any() and not tok.encoder.head.bias.any()
    with pytest.raises(ValueError, match="unknown init"):
        FlexTok(**{**TINY, "linear_init": "orthogonal"})


def test_patches_wider_than_the_decoder_warn():
    with pytest.warns(UserWarning, match="192 values but decoder_width is 32"):
        FlexTok(**TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FlexTok(**{**TINY, "patch_size": 2})  # 12 values under a 32-wide decoder: no warning


@pytest.mark.parametrize("std", [0.02, 0.3])
def test_register_init_std_sets_both_register_tables(std):
    tok = FlexTok(**{**TINY, "num_registers": 64, "encoder_width": 64, "decoder_width": 64,
                     "register_init_std": std})
    for table in (tok.encoder.registers, tok.decoder.register_pos_embed):
        assert abs(float(table.detach().std()) / std - 1) < 0.05
    assert build_tokenizer(tok.config).config["register_init_std"] == std


def test_register_init_std_separates_registers_with_equal_codes():
    """What the demo's 0.3 buys on the decoder side: registers holding the same code start apart
    (at 0.02 the embedded code dominates and they are nearly the same token)."""
    codes = torch.full((1, TINY["num_registers"], 6), 0.5)
    keep = torch.tensor([TINY["num_registers"]])
    similarity = {}
    for std in (0.02, 0.3):
        torch.manual_seed(0)
        tokens = FlexTok(**{**TINY, "register_init_std": std}).decoder.condition(codes, keep)[0]
        unit = torch.nn.functional.normalize(tokens, dim=-1)
        off_diagonal = (unit @ unit.T).masked_select(~torch.eye(len(unit), dtype=torch.bool))
        similarity[std] = float(off_diagonal.mean())
    assert similarity[0.02] > 0.95 > 0.8 > similarity[0.3], similarity
    with pytest.raises(ValueError, match="register_init_std"):
        FlexTok(**{**TINY, "register_init_std": 0.0})
