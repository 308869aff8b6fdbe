"""Divot without the reference fixtures: shapes, frame selection, the official transform on non-square
clips, the frame-ViT loading paths, and fresh random official-layout models of other sizes (our own
generator) that load through the official format and reproduce the model they were written from."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import SHARED
from helpers import reference_path

from tokenizers_vis import load_tokenizer
from tokenizers_vis.models.divot import Divot, sparse_frame_positions
from tokenizers_vis.models.divot_official import (
    DETOKENIZER_NAME,
    TOKENIZER_NAME,
    load_official_divot,
    official_state_dicts,
    save_official_divot,
)

TINY_VIT = {"image_size": 56, "patch_size": 14, "width": 32, "layers": 1, "head_width": 16, "output_dim": 16}
TINY_UNET = {"model_channels": 32, "channel_mult": [1, 1], "num_res_blocks": 1, "attention_resolutions": [2, 1],
             "num_head_channels": 16, "dropout": 0.0}
TINY_VAE = {"pretrained": None, "scaling_factor": 0.18215, "config": {
    "block_out_channels": [32, 32], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32,
    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2, "sample_size": 32}}


def tiny_divot(vit: dict | None = None, detok: bool = True, seed: int = 0, **sizes) -> Divot:
    """A tiny random Divot; every parameter (zero-initialised ones included) redrawn from `seed`."""
    torch.manual_seed(seed)
    args = dict(frame_vit={"pretrained": None, "config": {**TINY_VIT, **(vit or {})}}, image_size=64,
                vit_image_size=(vit or {}).get("image_size", TINY_VIT["image_size"]), video_size=16,
                temporal_width=32, temporal_depth=1, temporal_heads=4, hidden_size=32, pool_size=3, st_depth=1,
                st_heads=4, num_tokens=8, token_dim=16, resampler_depth=1, resampler_heads=2, resampler_head_dim=16,
                context_tokens=9, context_dim=32, context_depth=1, context_heads=2, context_head_dim=16)
    args.update(sizes)
    if detok:
        args.setdefault("unet", TINY_UNET)
        args.setdefault("vae", TINY_VAE)
    model = Divot(**args)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            draw = torch.randn(p.shape, generator=generator)
            p.copy_(draw * 0.5 if p.dim() < 2 else draw * p[0].numel() ** -0.5)  # fan-in scale
    return model.eval()


def clip(batch: int = 1, h: int = 64, w: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 16, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model() -> Divot:
    return tiny_divot()


def test_sparse_frames_are_every_fourth_and_the_last():
    assert sparse_frame_positions(16, 4) == [0, 4, 8, 12, 15]
    assert sparse_frame_positions(13, 4) == [0, 4, 8, 12]


def test_five_frames_give_num_tokens_by_token_dim():
    model = tiny_divot(detok=False, num_tokens=64, token_dim=24)
    with torch.no_grad():
        enc = model.encode(clip(2))
    assert enc.ids is None and enc.latents.shape == (2, 64, 24)
    assert model.stages(torch.zeros(1, 5, 3, 64, 64))["st"].shape == (1, 5 * 9, 32)


def test_only_the_sparse_frames_reach_the_tokens(model):
    video = clip()
    with torch.no_grad():
        base = model.encode(video).latents
        unseen = video.clone()
        unseen[:, [1, 2, 3, 5, 14]] = 0.0
        seen = video.clone()
        seen[:, 15] = 0.0
        assert torch.equal(model.encode(unseen).latents, base)
        assert not torch.allclose(model.encode(seen).latents, base)


def test_non_square_clips_are_centre_cropped(model):
    wide = clip(1, 64, 96)
    with torch.no_grad():
        assert torch.equal(model.encode(wide).latents, model.encode(wide[..., 16:80].contiguous()).latents)
        tall_large = clip(1, 192, 128)  # shorter side 128 -> 64, then a 64 x 64 centre crop
        assert model.encode(tall_large).latents.shape == (1, 8, 16)


def test_input_checks(model):
    with pytest.raises(ValueError, match="16 frames"):
        model.encode(clip()[:, :8])
    with pytest.raises(ValueError, match="clips of 16 frames"):
        model.encode(torch.rand(1, 3, 64, 64))


def test_decode_shapes_range_and_replay(model):
    tokens = torch.randn(1, 8, 16)
    shape = model.latent_shape(1)
    assert shape == (1, 4, 16, 8, 8)
    g = torch.Generator().manual_seed(3)
    noise = [torch.randn(shape, generator=g) for _ in range(3)]
    with torch.no_grad():
        a = model.decode(tokens, steps=2, noise=noise)
        b = model.decode(model.encode(clip()), steps=2, noise=noise)
        again = model.decode(tokens, steps=2, noise=noise)
    assert a.shape == (1, 16, 3, 16, 16)
    assert torch.equal(a, again) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="tokens"):
        model.decode(torch.randn(1, 7, 16), steps=2)


# Our generator of official-layout models: sizes the fixture does not cover.
SIZES = {
    "patch16_pool4": dict(vit={"patch_size": 16, "image_size": 64, "width": 48, "head_width": 24}, pool_size=4),
    "deeper_more_heads": dict(temporal_depth=2, temporal_heads=8, st_depth=3, st_heads=8, resampler_depth=2,
                              resampler_heads=4, resampler_head_dim=8, context_depth=2, context_heads=4,
                              context_head_dim=8, unet={**TINY_UNET, "num_res_blocks": 2, "num_head_channels": 8}),
    "pool2_wide_tokens": dict(pool_size=2, num_tokens=12, token_dim=20, context_tokens=14, context_dim=64,
                              unet={**TINY_UNET, "model_channels": 64, "channel_mult": [1, 2],
                                    "attention_resolutions": [1], "num_head_channels": 32}),
}


@pytest.mark.parametrize("name", sorted(SIZES))
def test_random_official_layout_models_of_other_sizes_reproduce(name, tmp_path):
    ours = tiny_divot(seed=7, **SIZES[name])
    folder = save_official_divot(ours, tmp_path / name)
    assert (folder / TOKENIZER_NAME).is_file() and (folder / DETOKENIZER_NAME).is_file()
    tok = torch.load(folder / TOKENIZER_NAME)
    assert any(k.startswith("image_proj_model.down_sampler.layers.0.0.to_kv") for k in tok)
    loaded = load_tokenizer(folder)
    assert isinstance(loaded, Divot)
    video = clip(1, 72, 100, seed=5)  # non-square: resized to shorter side 64 and centre-cropped
    g = torch.Generator().manual_seed(4)
    noise = [torch.randn(ours.latent_shape(1), generator=g) for _ in range(3)]
    with torch.no_grad():
        enc_a, enc_b = ours.encode(video), loaded.encode(video)
        assert torch.equal(enc_a.latents, enc_b.latents)
        assert torch.equal(ours.decode(enc_a, steps=2, noise=noise), loaded.decode(enc_b, steps=2, noise=noise))
    for (key, a), (_, b) in zip(ours.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), key


def test_encoder_only_folder_and_frame_vit_from_a_local_file(tmp_path):
    ours = tiny_divot(detok=False, seed=2)
    folder = save_official_divot(ours, tmp_path / "enc")
    assert not (folder / DETOKENIZER_NAME).exists()
    # the released file may lack the frame ViT: it then comes from `frame_vit_pretrained`
    state = torch.load(folder / TOKENIZER_NAME)
    vit = {k[len("vit_model.model.visual."):]: v for k, v in state.items() if k.startswith("vit_model.model.visual.")}
    torch.save({k: v for k, v in state.items() if not k.startswith("vit_model.")}, folder / TOKENIZER_NAME)
    vit_file = tmp_path / "vit.pt"
    torch.save(vit, vit_file)
    loaded = load_official_divot(folder, frame_vit_pretrained=str(vit_file))
    assert loaded.decoder is None
    video = clip(seed=9)
    with torch.no_grad():
        assert torch.equal(loaded.encode(video).latents, ours.encode(video).latents)
    with pytest.raises(ValueError, match="de-tokenizer"):
        loaded.decode(torch.randn(1, 8, 16), steps=1)


def test_frame_vit_is_frozen_and_rebuilds_from_config(model):
    assert "frame_vit" in model.frozen_parts
    assert not any(p.requires_grad for p in model.frame_vit.parameters())
    assert all(p.requires_grad for p in model.temporal_encoder.parameters())
    model.train()
    assert not model.frame_vit.training
    model.eval()


def test_released_sizes_match_the_official_key_list():
    """Our full-size model, written in the official layout, has exactly the released keys and shapes
    (built on the meta device: no memory, no weights)."""
    path = reference_path(SHARED, "divot", "full_size_keys.json")
    listing = json.loads(path.read_text())
    vit = {"image_size": 224, "patch_size": 14, "width": 1280, "layers": 32, "head_width": 80, "output_dim": 1024}
    unet = {"model_channels": 320, "channel_mult": [1, 2, 4, 4], "num_res_blocks": 2,
            "attention_resolutions": [4, 2, 1], "num_head_channels": 64}
    vae = {"pretrained": None, "scaling_factor": 0.18215, "config": {
        "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}}
    with torch.device("meta"):
        full = Divot(frame_vit={"pretrained": None, "config": vit}, unet=unet, vae=vae)
    tok, detok = official_state_dicts(full)
    assert (full.num_tokens, full.token_dim) == (64, 256)

    def shapes(group):
        return {e["key"]: tuple(e["shape"]) for e in listing[group]["keys"]}

    text_leftovers = {k for k in shapes("encoder") if k.startswith("vit_model.model.") and ".visual." not in k}
    assert len(text_leftovers) == 6
    assert {k: tuple(v.shape) for k, v in tok.items()} == {k: s for k, s in shapes("encoder").items()
                                                            if k not in text_leftovers}
    for group, prefix in (("detok_image_proj_model", "image_proj_model."), ("detok_diffusion_model", "diffusion_model."),
                          ("detok_first_stage_model", "first_stage_model.")):
        ours = {k[len(prefix):]: tuple(v.shape) for k, v in detok.items() if k.startswith(prefix)}
        assert ours == shapes(group), group


def test_saved_folder_rebuilds_offline_bit_for_bit(model, tmp_path):
    from tokenizers_vis.models.loading import save_pretrained

    config = model.config
    assert config["frame_vit"]["pretrained"] is None and config["frame_vit"]["config"]["width"] == 32
    assert config["vae"]["pretrained"] is None
    save_pretrained(model, tmp_path / "saved")
    loaded = load_tokenizer(tmp_path / "saved")
    for (key, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), key
    video = clip(seed=11)
    with torch.no_grad():
        assert torch.equal(model.encode(video).latents, loaded.encode(video).latents)


def test_released_preset_args_build_the_released_architecture(monkeypatch, tmp_path):
    """The preset's official_args.json is what our released-size model writes back, and the preset
    fetches both released files (here from a fake Hub) into a folder the format recognises."""
    from tokenizers_vis.models import divot_official
    from tokenizers_vis.models.official import find_official_format, find_preset

    config = divot_official.divot_config(divot_official.RELEASED_ARGS)
    config["frame_vit"]["pretrained"] = None
    with torch.device("meta"):
        full = Divot(**config)
    assert divot_official.official_args(full)["config"] == {**divot_official.RELEASED_ARGS["config"]}
    assert (full.num_tokens, full.token_dim, full.video_size, full.decoder.vae.latent_channels) == (64, 256, 256, 4)

    fake_hub = tmp_path / "hub"
    fake_hub.mkdir()

    def fake_download(repo, name):
        assert repo == "TencentARC/Divot"
        (fake_hub / name).write_bytes(b"weights")
        return str(fake_hub / name)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_download)
    fmt, resolve = find_preset("TencentARC/Divot")
    folder = resolve(tmp_path / "cache")
    assert fmt.name == "divot" and find_official_format(folder) is fmt
    assert json.loads((folder / "official_args.json").read_text()) == divot_official.RELEASED_ARGS
