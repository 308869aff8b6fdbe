"""Official-layout FlexToks of other sizes load from their config and weights alone.

Each case is a fresh random FlexTok of ours (other sin-cos max_sizes, register counts, FSQ levels,
widths, depths, head sizes, VAE block widths / depths / latent channels and scaling factors), written
here in the released layout: the official state_dict names, the official `posembs` tables computed
from the formula of the official code (not from our position module), and the `_target_` config in
the safetensors metadata. Nothing else goes into the folder (no test metadata). Loading it must
reproduce the written model's token ids, encoder outputs and flow samples at several image sizes.
"""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from tokenizers_vis import load_tokenizer
from tokenizers_vis.models.flextok import FlexTok
from tokenizers_vis.models.flextok_official import load_official

ENC, DEC = "encoder.module_dict.", "decoder.module_dict."

CASES = {
    # The failing case of issue 20: an f8 VAE with tables (20 x 24 patches) larger than the 16 x 16
    # grid of a 256 px image; non-square sizes, up to the largest the tables cover.
    "f8_tables_past_256px": dict(
        vae=dict(widths=[8, 16, 16, 16], groups=8, latent=4, layers=1, scaling=0.6),
        patch=2, max_sizes=[20, 24], registers=8, levels=[8, 5, 5, 5],
        encoder=(64, 2, 32), decoder=(32, 1, 16),
        sizes=[(64, 64), (96, 160), (320, 384)], default_size=256),
    # f2 VAE with 32 groups (the official count), 1x1 patches, tables smaller than the default latent.
    "f2_patch1_small_tables": dict(
        vae=dict(widths=[32, 64], groups=32, latent=8, layers=2, scaling=1.7),
        patch=1, max_sizes=[12, 10], registers=16, levels=[8, 8, 8, 5, 5, 5],
        encoder=(32, 1, 8), decoder=(48, 2, 16),
        sizes=[(24, 20), (8, 14)], default_size=20),
    # f4 VAE, square tables, three attention heads, the released FSQ.
    "f4_three_heads": dict(
        vae=dict(widths=[16, 16, 32], groups=16, latent=6, layers=1, scaling=0.25),
        patch=2, max_sizes=[8, 8], registers=4, levels=[7, 5, 5, 3],
        encoder=(48, 1, 16), decoder=(64, 2, 32),
        sizes=[(64, 64), (32, 48)], default_size=64),
}


def _vae_config(case):
    vae, n = case["vae"], len(case["vae"]["widths"])
    return {"down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": vae["widths"], "layers_per_block": vae["layers"], "latent_channels": vae["latent"],
            "norm_num_groups": vae["groups"]}


def _random_model(case, seed=0):
    """Our FlexTok with every weight re-drawn (the init zeroes the heads and adaLN, which would make
    the outputs trivial), scaled so that the codes spread over the FSQ grid."""
    torch.manual_seed(seed)
    (ew, ed, eh), (dw, dd, dh) = case["encoder"], case["decoder"]
    down = 2 ** (len(case["vae"]["widths"]) - 1)
    model = FlexTok(image_size=case["patch"] * down,
                    max_image_size=[s * case["patch"] * down for s in case["max_sizes"]],
                    vae={"config": _vae_config(case), "scaling_factor": case["vae"]["scaling"]},
                    patch_size=case["patch"], num_registers=case["registers"], levels=case["levels"],
                    encoder_width=ew, encoder_depth=ed, encoder_heads=ew // eh,
                    decoder_width=dw, decoder_depth=dd, decoder_heads=dw // dh)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("vae."):
                continue
            if p.dim() >= 2:
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
                if "modulation" in name:
                    p.mul_(0.5)
                if name == "encoder.head.weight":
                    p.mul_(2.0)
            else:
                p.copy_(torch.randn_like(p) * (0.5 if "register" in name or name.endswith(("token", "condition"))
                                               else 0.1))
        model.encoder.registers.normal_(0, 0.5)
        model.decoder.register_pos_embed.normal_(0, 0.5)
    return model.eval()


def official_sincos(dim, rows, cols):
    """The official `posembs` [1, D, rows, cols]: at (i, j), [sin(i w), cos(i w), sin(j w), cos(j w)]
    with w_k = 10000^(-k / (D/4)) (the formula of the official code, written out here)."""
    omega = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    i = torch.arange(rows, dtype=torch.float64)[:, None, None] * omega
    j = torch.arange(cols, dtype=torch.float64)[None, :, None] * omega
    i, j = i.expand(rows, cols, -1), j.expand(rows, cols, -1)
    table = torch.cat([i.sin(), i.cos(), j.sin(), j.cos()], dim=-1)
    return table.permute(2, 0, 1)[None].float().contiguous()


def official_state(model, max_sizes):
    """Our state_dict under the official names and layouts (the inverse of the documented mapping)."""
    out = {}
    for name, value in model.state_dict().items():
        part, _, rest = name.partition(".")
        prefix = ENC if part == "encoder" else DEC
        trunk = f"{prefix}{'enc' if part == 'encoder' else 'dec'}_transformer."
        if part == "vae":
            out["vae.vae." + name[len("vae.model."):]] = value
        elif rest.startswith("patch_embed.proj."):
            emb = "enc_patch_emb" if part == "encoder" else "dec_noise_patch_emb"
            kind = rest.rsplit(".", 1)[1]
            # (p q c)-ordered Linear on patches, the official patch embedding.
            out[f"{prefix}{emb}.patch_proj.{kind}"] = (value.permute(0, 2, 3, 1).reshape(value.shape[0], -1)
                                                      if kind == "weight" else value)
        elif rest.startswith("transformer.blocks."):
            block = trunk + rest[len("transformer."):]
            if block.endswith("attn.qkv.weight"):
                for key, chunk in zip(("wq", "wk", "wv"), value.chunk(3)):
                    out[block.replace("qkv", key)] = chunk
            elif block.endswith("mlp.fc1.weight"):  # ours stacks (value, gate) = (fc3, fc1)
                value_half, gate = value.chunk(2)
                out[block.replace("fc1", "fc3")], out[block] = value_half, gate
            else:
                out[block.replace(".modulation.", ".adaLN_modulation.1.")] = value
        else:
            official = {
                "encoder.registers": ENC + "enc_register_module.registers",
                "encoder.head.weight": ENC + "enc_to_latents.proj.weight",
                "encoder.head.bias": ENC + "enc_to_latents.proj.bias",
                "decoder.token_embed.weight": DEC + "dec_from_latents.proj.weight",
                "decoder.token_embed.bias": DEC + "dec_from_latents.proj.bias",
                "decoder.mask_token": DEC + "dec_nested_dropout.dropout_mask_token",
                "decoder.null_condition": DEC + "dec_latent_dropout.nullcond",
                "decoder.head.modulation.weight": DEC + "dec_to_patches.adaLN_modulation.1.weight",
                "decoder.head.modulation.bias": DEC + "dec_to_patches.adaLN_modulation.1.bias",
                "decoder.head.proj.weight": DEC + "dec_to_patches.proj.weight",
                "decoder.head.proj.bias": DEC + "dec_to_patches.proj.bias",
            }
            if name == "decoder.register_pos_embed":
                out[DEC + "dec_registers_posemb_module.posembs"] = value.t()[None, None].contiguous()
            elif name.startswith("decoder.time_embed.mlp."):
                out[DEC + "dec_time_embedder.mlp." + name[len("decoder.time_embed.mlp."):]] = value
            else:
                out[official[name]] = value
    out[ENC + "enc_posemb_module.posembs"] = official_sincos(model.encoder.registers.shape[1], *max_sizes)
    out[DEC + "dec_patches_posemb_module.posembs"] = official_sincos(model.decoder.mask_token.shape[0], *max_sizes)
    return out


def official_config(case):
    """The `_target_` config of the released layout (the entries the official classes need)."""
    f = "flextok."
    (ew, ed, eh), (dw, dd, dh) = case["encoder"], case["decoder"]
    patch, channels = [case["patch"]] * 2, case["vae"]["latent"]

    def trunk(dim, depth, head_dim, **extra):
        return {"_target_": f + "model.trunks.transformers.FlexTransformer", "dim": dim, "depth": depth,
                "head_dim": head_dim, "mlp_ratio": 4.0, "qkv_bias": False, "proj_bias": False, "mlp_bias": False,
                "gated_mlp": True, "qk_norm": True, **extra}

    return {
        "_target_": f + "flextok_wrapper.FlexTok",
        "vae": {"_target_": f + "vae_wrapper.StableDiffusionVAE", "latent_channels": channels,
                "scaling_factor": case["vae"]["scaling"], "hf_hub_path": None, "sample_posterior": True,
                "frozen": True},
        "encoder": {"_target_": f + "model.utils.wrappers.SequentialModuleDictWrapper", "module_dict": {
            "enc_patch_emb": {"_target_": f + "model.preprocessors.patching.PatchEmbedder", "patch_sizes": patch,
                              "channels_in": channels, "dim": ew},
            "enc_posemb_module": {"_target_": f + "model.utils.posembs.PositionalEmbeddingAdder", "dim": ew,
                                  "max_sizes": case["max_sizes"], "posemb_type": "sincos"},
            "enc_register_module": {"_target_": f + "model.preprocessors.registers.Registers1D", "dim": ew,
                                    "n_min": case["registers"], "n_max": case["registers"]},
            "enc_seq_packer": {"_target_": f + "model.preprocessors.flex_seq_packing.BlockWiseSequencePacker",
                               "mask_mode": "causal_last", "pad_to_multiple": 128},
            "enc_transformer": trunk(ew, ed, eh),
            "enc_to_latents": {"_target_": f + "model.postprocessors.heads.LinearHead", "dim": ew,
                               "dim_out": len(case["levels"])},
        }},
        "decoder": {"_target_": f + "model.utils.wrappers.SequentialModuleDictWrapper", "module_dict": {
            "dec_from_latents": {"_target_": f + "model.preprocessors.linear.LinearLayer",
                                 "dim_in": len(case["levels"]), "dim": dw},
            "dec_registers_posemb_module": {"_target_": f + "model.utils.posembs.PositionalEmbeddingAdder",
                                            "dim": dw, "max_sizes": [case["registers"]],
                                            "posemb_type": "learnable_sum"},
            "dec_nested_dropout": {"_target_": f + "model.preprocessors.token_dropout.MaskedNestedDropout",
                                   "dim": dw},
            "dec_latent_dropout": {"_target_": f + "model.preprocessors.nullcond.LearnedNullCond", "dim": dw,
                                   "dropout_prob": 0.1},
            "dec_noise_patch_emb": {"_target_": f + "model.preprocessors.patching.PatchEmbedder",
                                    "patch_sizes": patch, "channels_in": channels, "dim": dw},
            "dec_patches_posemb_module": {"_target_": f + "model.utils.posembs.PositionalEmbeddingAdder", "dim": dw,
                                          "max_sizes": case["max_sizes"], "posemb_type": "sincos"},
            "dec_time_embedder": {"_target_": f + "model.preprocessors.time_embedding.TimestepEmbedder", "dim": dw,
                                  "frequency_embedding_size": 256, "max_timestep": 1.0},
            "dec_transformer": trunk(dw, dd, dh, adaLN_expansion=2),
            "dec_to_patches": {"_target_": f + "model.postprocessors.heads.ToPatchesLinearHead", "dim": dw,
                               "channels_out": channels, "patch_sizes": patch},
        }},
        "regularizer": {"_target_": f + "regularizers.quantize_fsq.FSQ", "levels": case["levels"]},
        "flow_matching_noise_module": {"_target_": f + "flow_matching.noise_modules.MinRFNoiseModule"},
        "pipeline": {"_target_": f + "flow_matching.pipelines.MinRFPipeline", "_partial_": True},
    }


def write_official(folder, model, case, config_json=None):
    """A folder in the released layout: the weights with the config as safetensors metadata (one
    Python-literal string per top-level key, as the released checkpoints store it)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = official_config(case)
    metadata = {k: (v if k == "_target_" else repr(v)) for k, v in config.items()}
    save_file(official_state(model, case["max_sizes"]), str(folder / "model.safetensors"), metadata=metadata)
    if config_json is not None:
        (folder / "config.json").write_text(json.dumps(config_json))
    return folder


def _images(batch, height, width, seed):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 4, 4, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (smooth + 0.05 * torch.rand(batch, 3, height, width, generator=g)).clamp(0, 1)


def _assert_same_outputs(source, loaded, case):
    down = 2 ** (len(case["vae"]["widths"]) - 1)
    with torch.no_grad():
        for n, (h, w) in enumerate(case["sizes"]):
            images = _images(2, h, w, seed=n)
            vae_noise = torch.randn(2, case["vae"]["latent"], h // down, w // down,
                                    generator=torch.Generator().manual_seed(10 + n))
            latents = source.to_latents(images, vae_noise)
            torch.testing.assert_close(loaded.to_latents(images, vae_noise), latents, atol=1e-5, rtol=0)
            torch.testing.assert_close(loaded.encoder(latents), source.encoder(latents), atol=1e-5, rtol=0)
            expected = source.encode(images, vae_noise=vae_noise)
            got = loaded.encode(images, vae_noise=vae_noise)
            assert torch.equal(got.ids, expected.ids), (h, w)
            assert expected.ids.unique().numel() > 1  # the codes spread: the comparison is not vacuous
            k = max(1, case["registers"] // 2)
            noise = loaded.initial_noise(2, torch.Generator().manual_seed(20 + n), "cpu", (h, w))
            assert noise.shape == (2, case["vae"]["latent"], h // down, w // down)
            for guidance, apg in ((1.0, False), (2.5, True)):
                sample = loaded.sample_latents(got, num_tokens=k, steps=2, guidance=guidance, apg=apg, noise=noise)
                reference = source.sample_latents(expected, num_tokens=k, steps=2, guidance=guidance, apg=apg,
                                                  noise=noise)
                torch.testing.assert_close(sample, reference, atol=1e-5, rtol=0)
        # decode follows the size of the encoded images; the VAE decoder once, at the last size.
        decoded = loaded.decode(got, num_tokens=k, steps=1, guidance=1.0, generator=torch.Generator().manual_seed(3))
        assert decoded.shape == images.shape
        torch.testing.assert_close(decoded, source.decode(expected, num_tokens=k, steps=1, guidance=1.0,
                                                          generator=torch.Generator().manual_seed(3)),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_an_official_layout_of_another_size_loads_from_config_and_weights_and_reproduces_it(tmp_path, name):
    case = CASES[name]
    source = _random_model(case)
    folder = write_official(tmp_path / name, source, case)
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors"]  # config and weights, nothing else
    loaded = load_tokenizer(folder)
    assert isinstance(loaded, FlexTok) and not loaded.training
    down = 2 ** (len(case["vae"]["widths"]) - 1)
    # The largest size comes from the config: max_sizes (patches) x patch size x VAE downsampling.
    assert loaded.max_image_size == tuple(s * case["patch"] * down for s in case["max_sizes"])
    # The default decode size: the official default latent (32), capped to the tables.
    assert loaded.image_size == case["default_size"]
    assert loaded.num_tokens == case["registers"] and loaded.codebook_size == math.prod(case["levels"])
    assert loaded.vae.scaling_factor == case["vae"]["scaling"]
    assert loaded.vae.model.config.norm_num_groups == case["vae"]["groups"]
    expected = source.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    _assert_same_outputs(source, loaded, case)


def test_sizes_outside_the_tables_are_refused_naming_the_largest(tmp_path):
    case = CASES["f4_three_heads"]  # f4 x patch 2: sides in multiples of 8 up to 64
    loaded = load_tokenizer(write_official(tmp_path / "m", _random_model(case), case))
    for size in ((72, 64), (64, 36)):
        with pytest.raises(ValueError, match=r"multiples of 8 .* up to 64x64 \(max_image_size\)"):
            loaded.encode(torch.rand(1, 3, *size))
    ids = torch.zeros(1, case["registers"], dtype=torch.long)
    with pytest.raises(ValueError, match="up to 64x64"):
        loaded.decode(ids, steps=1, image_size=(64, 72))
    with pytest.raises(ValueError, match="noise must have shape"):
        loaded.decode(ids, steps=1, noise=torch.zeros(1, case["vae"]["latent"], 18, 16))


def test_test_metadata_in_the_config_is_never_read(tmp_path):
    """A `reference_fixture` block (the test metadata of the shared fixture) in config.json, here with
    wrong values, changes nothing: the loader reads only the official config and the weights."""
    case = CASES["f4_three_heads"]
    source = _random_model(case)
    decoy = {**official_config(case), "reference_fixture": {
        "image_size": 8, "vae_effective_diffusers_config": {**_vae_config(case), "block_out_channels": [4, 4]}}}
    loaded = load_tokenizer(write_official(tmp_path / "m", source, case, config_json=decoy))
    assert loaded.image_size == 64 and list(loaded.vae.model.config.block_out_channels) == [16, 16, 32]
    _assert_same_outputs(source, loaded, {**case, "sizes": case["sizes"][:1]})


def test_a_group_count_the_weights_cannot_show_is_given_explicitly(tmp_path):
    """GroupNorm group counts are not in the weights: 32 (official) where it divides every block
    width, else the largest count up to 32 that does. A VAE built otherwise loads with `vae_config`."""
    case = {**CASES["f4_three_heads"], "vae": {**CASES["f4_three_heads"]["vae"], "groups": 4}}
    source = _random_model(case)
    folder = write_official(tmp_path / "m", source, case)
    images = _images(1, 32, 32, seed=0)
    inferred = load_official(folder)
    assert inferred.vae.model.config.norm_num_groups == 16
    with torch.no_grad():
        assert not torch.allclose(inferred.to_latents(images), source.to_latents(images), atol=1e-3)
    explicit = load_official(folder, vae_config={"norm_num_groups": 4})
    _assert_same_outputs(source, explicit, {**case, "sizes": [(32, 32)]})
