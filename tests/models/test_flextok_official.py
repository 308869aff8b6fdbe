"""Our FlexTok against the official one: shared/reference/flextok (random weights, official outputs)."""

import functools
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from helpers import reference_path
from safetensors.torch import load_file, save_file

from tokenizers_vis import load_tokenizer
from tokenizers_vis.models.flextok import FlexTok
from tokenizers_vis.models.flextok_official import convert_config, convert_state_dict, read_official_config

ATOL = 1e-4  # the README's suggested tolerance for every float output




@pytest.fixture
def fixture_dir(shared_dir):
    return reference_path(shared_dir, "flextok", "tiny.safetensors").parent


def _split(path):
    tensors = load_file(str(path / "tiny.safetensors"))
    state = {k[len("state_dict."):]: v for k, v in tensors.items() if k.startswith("state_dict.")}
    io = {k[len("io."):]: v for k, v in tensors.items() if k.startswith("io.")}
    return state, io


@functools.cache
def _official_folder(fixture_dir: Path):
    """A folder in the released layout: safetensors with the `_target_` config as metadata, and
    config.json (the fixture's YAML, whose `reference_fixture` names the small VAE). Built once."""
    state, io = _split(fixture_dir)
    config = yaml.safe_load((fixture_dir / "tiny.yaml").read_text())
    folder = Path(tempfile.mkdtemp(prefix="flextok_official_"))
    metadata = {k: (v if isinstance(v, str) else repr(v)) for k, v in config.items() if k != "reference_fixture"}
    save_file(state, str(folder / "model.safetensors"), metadata=metadata)
    (folder / "config.json").write_text(json.dumps(config))
    return folder, state, io, config, load_tokenizer(folder)


@pytest.fixture
def official(fixture_dir):
    return _official_folder(fixture_dir)


def test_strict_load_after_the_mapping_and_load_tokenizer_recognises_the_layout(official):
    folder, state, _, config, tok = official
    assert isinstance(tok, FlexTok) and not tok.training
    assert tok.num_tokens == 32 and tok.codebook_size == 64000
    # From the config alone: max_sizes 8 patches x patch 2 x f8 VAE; the fixture's 64 px images fit.
    assert tok.max_image_size == (128, 128) and tok.image_size == 128
    fresh = FlexTok(**convert_config(config, state=state))
    converted = convert_state_dict(state, fresh.latent_channels)
    converted = {k: v for k, v in converted.items() if not k.startswith("_sincos.")}
    assert set(converted) == set(fresh.state_dict())  # every official tensor lands, nothing is missing
    fresh.load_state_dict(converted, strict=True)


def test_the_config_is_read_from_the_safetensors_metadata_without_config_json(official, tmp_path):
    folder, _, _, config, _ = official
    shutil.copy(folder / "model.safetensors", tmp_path / "model.safetensors")
    expected = {k: v for k, v in config.items() if k != "reference_fixture"}
    assert read_official_config(tmp_path) == expected


def test_vae_encoder_fsq_and_ids(official):
    _, _, io, _, tok = official
    images = io["input.images"]  # [-1, 1], the official range; ours is [0, 1]
    with torch.no_grad():
        mean, _ = tok.vae.posterior(images)
        torch.testing.assert_close(mean, io["vae.posterior_mean"], atol=ATOL, rtol=0)
        latents = tok.to_latents((images + 1) / 2, io["vae.posterior_noise"])
        torch.testing.assert_close(latents, io["vae.latents"], atol=ATOL, rtol=0)
        torch.testing.assert_close(tok.vae.decode(io["vae.latents"]), io["vae.reconstruction"], atol=ATOL, rtol=0)
        pre_fsq = tok.encoder(io["vae.latents"])
        torch.testing.assert_close(pre_fsq, io["encoder.registers_pre_fsq"], atol=ATOL, rtol=0)
        encoded = tok.encode((images + 1) / 2, vae_noise=io["vae.posterior_noise"])
    assert torch.equal(encoded.latents, io["fsq.quants"])
    assert torch.equal(encoded.ids, io["tokens.ids"])
    assert encoded.ids.shape == (2, 32)


def test_decoder_velocity_trace(official):
    _, _, io, _, tok = official
    ids = io["tokens.ids"]
    with torch.no_grad():
        codes = tok.quantize.embed(ids)
        cond = tok.decoder.condition(codes, torch.full((2,), 32))
        for step in range(4):
            v, _ = tok.decoder(io["trace.k32_g1p0.x_t"][step], io["trace.k32_g1p0.t"][step], cond)
            torch.testing.assert_close(v, io["trace.k32_g1p0.velocity"][step], atol=ATOL, rtol=0)
        keep4 = torch.full((2,), 4)
        uncond = tok.decoder.condition(codes, keep4, torch.ones(2, dtype=torch.bool))
        v_u, _ = tok.decoder(io["trace.k4_g3p0_apg.x_t"][1], io["trace.k4_g3p0_apg.t"][1], uncond)
        torch.testing.assert_close(v_u, io["trace.k4_g3p0_apg.velocity_uncond"][1], atol=ATOL, rtol=0)


def test_every_detokenize_output_with_the_saved_noise(official):
    _, _, io, config, tok = official
    ids = io["tokens.ids"]
    runs = config["reference_fixture"]["sampler"]["runs"]
    assert len(runs) == 9
    latents = []
    with torch.no_grad():
        for run in runs:
            k, scale, apg = run["keep_k"], run["guidance_scale"], run["perform_norm_guidance"]
            key = run["key"][len("io."):]
            out = tok.sample_latents(ids[:, :k], num_tokens=k, steps=4, guidance=scale, apg=apg,
                                     noise=io["noise.initial"])
            torch.testing.assert_close(out, io[f"{key}.latents"], atol=ATOL, rtol=0, msg=run["key"])
            latents.append(out)
        # decode = to_images(sample_latents): the VAE decoder once over all runs (it is the slow part).
        images = tok.to_images(torch.cat(latents)) * 2 - 1
    expected = torch.cat([io[run["key"][len("io."):] + ".images"] for run in runs])
    torch.testing.assert_close(images, expected, atol=ATOL, rtol=0)
    k4 = tok.decode(ids[:, :4], num_tokens=4, steps=4, guidance=3.0, apg=True, noise=io["noise.initial"])
    torch.testing.assert_close(k4 * 2 - 1, io["detok.k4_g3p0_apg.images"], atol=ATOL, rtol=0)
    # The seeded generator draws the same initial noise as the official pipeline.
    generated = tok.initial_noise(2, torch.Generator().manual_seed(2024), "cpu", image_size=64)
    assert torch.equal(generated, io["noise.initial"])


@pytest.mark.parametrize("name,enc,dec", [("flextok_d12_d12", (768, 12), (768, 12)),
                                          ("flextok_d18_d18", (1152, 18), (1152, 18)),
                                          ("flextok_d18_d28", (1152, 18), (1792, 28))])
def test_released_sizes_map_strictly(fixture_dir, name, enc, dec):
    """The released key names and shapes (full_size_keys.json) convert onto our model at that size,
    built on the meta device (no memory), with nothing missing and nothing left over."""
    from tokenizers_vis.models.flextok_official import OFFICIAL_VAE_CONFIG

    shapes = json.loads((fixture_dir / "full_size_keys.json").read_text())[name]
    state = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    with torch.device("meta"):
        ours = FlexTok(image_size=256, vae={"config": OFFICIAL_VAE_CONFIG, "scaling_factor": 1.0}, patch_size=2,
                       num_registers=256, encoder_width=enc[0], encoder_depth=enc[1], encoder_heads=enc[0] // 64,
                       decoder_width=dec[0], decoder_depth=dec[1], decoder_heads=dec[0] // 64)
    converted = convert_state_dict(state, 16)
    sincos = {k for k in converted if k.startswith("_sincos.")}
    assert len(sincos) == 2
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in converted.items() if k not in sincos}
    assert got == expected
    counts = json.loads((fixture_dir / "full_size_keys.json").read_text())["_param_counts"][name]
    # The official count includes the two sin-cos tables, which we recompute instead of storing.
    sincos_numel = sum(torch.Size(shapes[k]).numel() for k in shapes if k.endswith("posemb_module.posembs")
                       and "registers" not in k)
    assert sum(v.numel() for v in ours.parameters()) == counts["_total"] - sincos_numel
