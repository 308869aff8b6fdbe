"""Weight compatibility with the released TiTok (official layout in, official layout out).

The reference cases (shared/reference/titok/, see its README) hold small official models with
random weights, an input batch and the outputs the official code computed; tolerances are the
README's: indices exact, case-1 reconstructions 3e-4, posterior KL 1e-4, everything else 2e-5.
"""

import json
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tokenizers_vis import build_tokenizer, load_tokenizer
from tokenizers_vis.models import TiTok
from tokenizers_vis.models.titok_official import (
    config_from_official,
    official_config,
    official_key,
    official_state_dict,
    save_official,
)

CASES = ["case1_legacy_vq_pixeldecoder", "case2_vq_direct_pixels", "case3_vae_direct_pixels"]
ATOL = 2e-5


def read_case(shared_dir, case):
    """(official config.json dict, official state dict, io tensors) of one reference case."""
    config = yaml.safe_load((shared_dir / f"reference/titok/{case}.yaml").read_text())
    fixture = config.pop("reference_fixture")
    # The two extension keys of config.json that describe small models.
    config.update({key: fixture[key] for key in ("model_sizes", "pixel_decoder") if key in fixture})
    tensors = load_file(str(shared_dir / f"reference/titok/{case}.safetensors"))
    state = {k[len("state_dict."):]: v for k, v in tensors.items() if k.startswith("state_dict.")}
    io = {k[len("io."):]: v for k, v in tensors.items() if k.startswith("io.")}
    return config, state, io


def write_official_folder(directory, config, state, weights_format="safetensors"):
    """A folder in the layout of the released Hub repos."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if weights_format == "safetensors":
        save_file(state, str(directory / "model.safetensors"))
    else:
        torch.save(state, directory / "pytorch_model.bin")
    return directory


def tokens_last(t):
    """Official (B, C, 1, K) -> ours (B, K, C)."""
    return t[:, :, 0].transpose(1, 2)


def close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


@pytest.fixture(params=CASES)
def loaded_case(request, shared_dir, tmp_path):
    case = request.param
    config, state, io = read_case(shared_dir, case)
    # Case 3 ships its weights as pytorch_model.bin, the other format of the released repos.
    fmt = "bin" if case.startswith("case3") else "safetensors"
    tok = load_tokenizer(write_official_folder(tmp_path / case, config, state, fmt))
    return case, tok, state, io


@torch.no_grad()
def test_reference_case_outputs_match_the_official_implementation(loaded_case):
    case, tok, _, io = loaded_case
    assert isinstance(tok, TiTok) and not tok.training
    images = io["input.images"]
    captured = {}
    tok.encoder.ln_post.register_forward_hook(lambda m, i, out: captured.__setitem__("ln_post", out))
    encoded = tok.encode(images)
    close(captured["ln_post"], io["encoder.ln_post_output"])
    close(encoded.extras["pre_quant"], tokens_last(io["encoder.output"]))

    if case.startswith("case3"):
        post = tok.quantize.posterior(encoded.extras["pre_quant"])
        for key in ("mean", "logvar", "std"):
            close(post[key], tokens_last(io[f"posterior.{key}"]))
        close(post["kl"], io["posterior.kl"], atol=1e-4)
        close(encoded.latents, tokens_last(io["posterior.mode"]))
        # Deterministic path: decode(mode); sampled path: mean + std * the saved noise.
        close(tok.decoder.head.ffn(_decoder_trunk(tok, encoded.latents)), io["decoder.ffn_output"])
        close(tok.decode(encoded), io["reconstruction"])
        close(tok.decode(encoded.latents), io["decode_tokens.reconstruction"])
        sampled = tok.encode(images, noise=tokens_last(io["posterior.noise"]))
        close(sampled.latents, tokens_last(io["posterior.sample"]))
        close(tok.decode(sampled), io["reconstruction_sample"])
        return

    assert torch.equal(encoded.ids, io["quantizer.indices"][:, 0])
    close(encoded.latents, tokens_last(io["quantizer.z_quantized"]))
    close(tok.quantize.embed(encoded.ids), tokens_last(io["decode_tokens.z_quantized"]))
    if case.startswith("case1"):
        logits = tok.decode_logits(encoded)
        close(logits, io["decoder.logits"])
        close(tok.soft_proxy_codes(logits), io["pixel_decoder.input"])
        close(tok.logits_to_pixels(logits), io["reconstruction"], atol=3e-4)
        close(tok.decode(encoded), io["reconstruction"], atol=3e-4)
        close(tok.decode(io["quantizer.indices"][:, 0]), io["decode_tokens.reconstruction"], atol=3e-4)
    else:
        aux = encoded.extras["aux"]
        close(aux["commitment_loss"], io["quantizer.commitment_loss"])
        close(aux["codebook_loss"], io["quantizer.codebook_loss"])
        close(aux["loss"], io["quantizer.quantizer_loss"])
        close(tok.decoder.head.ffn(_decoder_trunk(tok, encoded.latents)), io["decoder.ffn_output"])
        close(tok.decode(encoded), io["reconstruction"])
        close(tok.decode(io["quantizer.indices"][:, 0]), io["decode_tokens.reconstruction"])


def _decoder_trunk(tok, latents):
    """The decoder's (B, W, grid, grid) features, the input of its head."""
    captured = {}
    handle = tok.decoder.head.register_forward_hook(lambda m, inputs, out: captured.__setitem__("x", inputs[0]))
    tok.decode(latents)
    handle.remove()
    return captured["x"]


def test_exported_reference_models_equal_the_official_state_dicts(loaded_case, tmp_path):
    """official -> ours -> official: the same keys, shapes and values as the official weights."""
    case, tok, state, _ = loaded_case
    save_official(tok, tmp_path / "export")
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert exported.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(exported[key], value), key


# -- the nine released configurations ------------------------------------------------------------
def official_released_config(enc, dec, tokens, mode="vq", codebook=4096, token_size=12, l2=True, legacy=None):
    vq = dict(vit_enc_model_size=enc, vit_dec_model_size=dec, vit_enc_patch_size=16, vit_dec_patch_size=16,
              num_latent_tokens=tokens, token_size=token_size)
    if mode == "vq":
        vq.update(codebook_size=codebook, use_l2_norm=l2, commitment_cost=0.25)
    else:
        vq.update(quantize_mode="vae")
    if legacy is not None:  # released S/B/L configs leave both flags out (official default: true)
        vq.update(is_legacy=legacy, finetune_decoder=legacy)
    return {"model": {"vq_model": vq}, "dataset": {"preprocessing": {"crop_size": 256}}}


VQ8K = dict(codebook=8192, token_size=64, l2=False, legacy=False)
VAE = dict(mode="vae", token_size=16, legacy=False)
RELEASED = {
    "titok_s128": official_released_config("small", "small", 128),
    "titok_b64": official_released_config("base", "base", 64),
    "titok_l32": official_released_config("large", "large", 32),
    "titok_bl64_vq8k": official_released_config("base", "large", 64, **VQ8K),
    "titok_bl128_vq8k": official_released_config("base", "large", 128, **VQ8K),
    "titok_sl256_vq8k": official_released_config("small", "large", 256, **VQ8K),
    "titok_ll32_vae_c16": official_released_config("large", "large", 32, **VAE),
    "titok_bl64_vae_c16": official_released_config("base", "large", 64, **VAE),
    "titok_bl128_vae_c16": official_released_config("base", "large", 128, **VAE),
}


@pytest.fixture
def full_size_keys(shared_dir):
    return json.loads((shared_dir / "reference/titok/full_size_keys.json").read_text())


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_configs_give_exactly_the_official_keys_and_shapes(name, full_size_keys):
    with torch.device("meta"):
        tok = build_tokenizer(config_from_official(RELEASED[name]))
    ours = {key: list(value.shape) for key, value in official_state_dict(tok).items()}
    assert ours == full_size_keys[name]


@pytest.mark.parametrize("name", ["titok_s128", "titok_b64", "titok_l32"])
def test_released_proxy_code_models_have_the_published_parameter_counts(name, full_size_keys):
    """S-128 83.7M, B-64 204.8M, L-32 641.1M, each with the 30.5M MaskGIT pixel decoder."""
    counts = full_size_keys["_param_counts"][name]
    with torch.device("meta"):
        tok = build_tokenizer(config_from_official(RELEASED[name]))
    assert tok.head_kind == "proxy_codes" and tok.config["pixel_decoder_channels"] == 128
    ours: dict[str, int] = {}
    for key, param in tok.named_parameters():
        ours[key.split(".")[0]] = ours.get(key.split(".")[0], 0) + param.numel()
    assert ours == {k: v for k, v in counts.items() if k != "_total"}
    assert sum(ours.values()) == counts["_total"]


# -- fresh random models: ours -> official layout -> ours ------------------------------------------
FRESH = {
    # Sizes unlike the reference cases: other widths, depths, heads, grid, token count, codebooks.
    "legacy_proxy_codes": dict(head="proxy_codes", legacy_reshape=True, quantizer="vq", token_dim=8,
                               codebook_size=96, use_l2_norm=True, pixel_decoder_channels=32,
                               pixel_decoder_channel_mult=(1, 1, 2, 2), pixel_decoder_res_blocks=1),
    "vq_pixels": dict(head="pixel", quantizer="vq", token_dim=24, codebook_size=80, use_l2_norm=False),
    "vae_pixels": dict(head="pixel", quantizer="vae", token_dim=6),
}
FRESH_SIZES = dict(image_size=64, patch_size=8, num_latent_tokens=12, encoder_size=None, decoder_size=None,
                   encoder_width=48, encoder_depth=3, encoder_heads=3, decoder_width=40, decoder_depth=2,
                   decoder_heads=5)


def randomize_(model, seed):
    """Non-trivial values everywhere (as the reference weights), so a dropped bias or norm shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() > 1:
                param.copy_(noise / param[0].numel() ** 0.5)
            elif name.endswith("weight"):
                param.copy_(1 + 0.2 * noise)
            else:
                param.copy_(0.1 * noise)
    return model


@pytest.mark.parametrize("variant", sorted(FRESH))
def test_fresh_random_model_survives_the_official_layout(variant, tmp_path):
    source = randomize_(TiTok(**FRESH_SIZES, **FRESH[variant]), seed=2024).eval()
    save_official(source, tmp_path / "official")
    config = json.loads((tmp_path / "official" / "config.json").read_text())
    assert "model_type" not in config and set(config["model_sizes"]) == {"w48_l3_h3", "w40_l2_h5"}
    assert ("pixel_decoder" in config) == (variant == "legacy_proxy_codes")
    assert set(load_file(str(tmp_path / "official" / "model.safetensors"))) == {
        official_key(k) for k, _ in source.named_parameters()}

    loaded = load_tokenizer(tmp_path / "official")
    assert loaded.config == {**source.config, "encoder_size": None, "decoder_size": None}
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = source.encode(images), loaded.encode(images)
        if a.ids is not None:
            assert torch.equal(a.ids, b.ids)
            torch.testing.assert_close(loaded.decode(a.ids), source.decode(a.ids), atol=0, rtol=0)
        torch.testing.assert_close(b.latents, a.latents, atol=0, rtol=0)
        torch.testing.assert_close(loaded.decode(b), source.decode(a), atol=0, rtol=0)
        if variant == "legacy_proxy_codes":
            torch.testing.assert_close(loaded.decode_logits(b), source.decode_logits(a), atol=0, rtol=0)


def test_released_sizes_export_without_extension_keys(tmp_path):
    """A model of a released structure writes a plain official config (no model_sizes / pixel_decoder)."""
    with torch.device("meta"):
        tok = build_tokenizer(config_from_official(RELEASED["titok_l32"]))
    config = official_config(tok)
    assert set(config) == {"experiment", "model", "dataset"}
    assert config_from_official(config) == config_from_official(RELEASED["titok_l32"])


# -- the proxy-code head ---------------------------------------------------------------------------
def test_proxy_code_head_decodes_pixels_through_the_soft_codes():
    tok = TiTok(**FRESH_SIZES, **FRESH["legacy_proxy_codes"]).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        encoded = tok.encode(images)
        logits = tok.decode_logits(encoded)
        assert logits.shape == (2, 1024, 8, 8)
        codes = tok.soft_proxy_codes(logits)
        assert codes.shape == (2, 256, 8, 8)
        expected = (logits.softmax(1).permute(0, 2, 3, 1) @ tok.pixel_quantize.embedding.weight).permute(0, 3, 1, 2)
        torch.testing.assert_close(codes, expected)
        torch.testing.assert_close(tok.decode(encoded), tok.pixel_decoder(codes), atol=0, rtol=0)
        out = tok(images)
    assert out.reconstruction.shape == images.shape
    torch.testing.assert_close(out.encoded.extras["proxy_logits"], logits, atol=0, rtol=0)
    assert tok.last_layer_weight() is tok.pixel_decoder.conv_out.weight
    assert "pixel_quantize.embedding.weight" in tok.no_weight_decay_names()
    with pytest.raises(ValueError, match="decode_logits needs head='proxy_codes'"):
        TiTok(**FRESH_SIZES, **FRESH["vq_pixels"]).decode_logits(encoded.latents)
    with pytest.raises(ValueError, match="must equal patch_size 8"):
        TiTok(**FRESH_SIZES, **{**FRESH["legacy_proxy_codes"], "pixel_decoder_channel_mult": (1, 2, 4)})


# -- errors ----------------------------------------------------------------------------------------
def test_mismatched_weights_are_refused_with_the_key_names(shared_dir, tmp_path):
    config, state, _ = read_case(shared_dir, "case2_vq_direct_pixels")
    state = dict(state)
    state["decoder.extra.weight"] = state.pop("decoder.conv_out.weight")
    expected = r"missing \['decoder.conv_out.weight'\].*unexpected \['decoder.extra.weight'\]"
    with pytest.raises(ValueError, match=expected):
        load_tokenizer(write_official_folder(tmp_path / "bad", config, state))


@pytest.mark.parametrize("change, message", [
    (dict(is_legacy=True, finetune_decoder=False), "does not decode to pixels"),
    (dict(vit_dec_model_size="huge"), "unknown TiTok model size 'huge'"),
    (dict(vit_dec_patch_size=8), "patch sizes differ"),
    (dict(quantize_mode="fsq"), "unsupported official quantize_mode"),
])
def test_unsupported_official_configs_fail_clearly(change, message):
    config = official_released_config("base", "large", 64, **VQ8K)
    config["model"]["vq_model"].update(change)
    with pytest.raises(ValueError, match=message):
        config_from_official(config)


def test_official_folder_without_weights_names_both_formats(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASED["titok_bl64_vq8k"]))
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        load_tokenizer(tmp_path)


def test_export_refuses_what_the_official_code_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="ties the legacy reshape"):
        save_official(TiTok(**FRESH_SIZES, **FRESH["vq_pixels"], legacy_reshape=True), tmp_path)


def test_released_hub_id_offline_fails_at_once_with_a_clear_message():
    start = time.monotonic()
    with pytest.raises(OSError, match="could not download 'yucornetto/tokenizer_titok_l32_imagenet'"):
        load_tokenizer("yucornetto/tokenizer_titok_l32_imagenet")
    assert time.monotonic() - start < 10
