"""Vision towers: the official TokenFlow semantic-encoder outputs from the reference fixtures, the
BEiT-style position-table interpolation, and the pretrained-loading paths (local tiny models only)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import reference_path

from tokenizers_vis.nn import vision_towers
from tokenizers_vis.nn.weights import MissingWeightsError
from tokenizers_vis.nn.transformer import interpolate_position_table
from tokenizers_vis.nn.vision_towers import (
    ClipVisionTower,
    SiglipVisionTower,
    build_vision_tower,
    official_input_scaling,
    official_key_to_ours,
    ours_key_to_official,
)

ATOL = 2e-5  # the fixtures' tolerance for everything but pixels
TINY_CLIP = dict(image_size=32, patch_size=4, width=64, layers=2, heads=2, output_dim=48)
TINY_SIGLIP = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                   image_size=28, patch_size=7)
KEY = "model.semantic_encoder.pretrained"


def load_fixture(shared_dir, case):
    from safetensors.torch import load_file

    path = reference_path(shared_dir, "tokenflow", f"{case}.safetensors")
    root = path.parent
    tensors = load_file(str(path))
    prefix = "state_dict.encoder_vqkd."
    state = {official_key_to_ours(k[len(prefix):]): v for k, v in tensors.items() if k.startswith(prefix)}
    io = {k[len("io."):]: v for k, v in tensors.items() if k.startswith("io.")}
    overrides = json.loads((root / f"{case}.json").read_text())["tiny_overrides"]["semantic_encoder"]
    return state, io, overrides


def fixture_clip(shared_dir, case):
    state, io, ov = load_fixture(shared_dir, case)
    tower = build_vision_tower("openai_clip", config=dict(
        image_size=ov["input_resolution"], patch_size=ov["patch_size"], width=ov["width"], layers=ov["layers"],
        heads=ov["heads"], output_dim=ov["output_dim"]))
    tower.drop_projection()  # the official loader deletes proj; the fixture has none
    tower.load_state_dict(state, strict=True)
    return tower.eval(), io


# -- position-table interpolation ------------------------------------------------------------------

def test_interpolate_position_table_identity_at_the_table_grid():
    table = torch.randn(36, 8)
    assert interpolate_position_table(table, 6) is table


@pytest.mark.parametrize("n, grid", [(6, 8), (14, 16), (24, 27), (8, 6), (5, 5 * 3)])
def test_interpolate_position_table_gives_grid_rows(n, grid):
    assert interpolate_position_table(torch.randn(n * n, 4), grid).shape == (grid * grid, 4)


def test_interpolate_position_table_uses_the_official_scale_factor_not_size():
    n, grid, dim = 6, 8, 5
    table = torch.randn(n * n, dim)
    square = table.reshape(1, n, n, dim).permute(0, 3, 1, 2)
    factor = (grid + 0.1) / n
    official = F.interpolate(square, scale_factor=(factor, factor), mode="bicubic", align_corners=False)
    resized = F.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False)
    rows = lambda t: t.permute(0, 2, 3, 1).reshape(grid * grid, dim)  # noqa: E731
    out = interpolate_position_table(table, grid)
    torch.testing.assert_close(out, rows(official), atol=0, rtol=0)
    # The two sampling grids really differ, so this test tells the semantics apart.
    assert (rows(resized) - out).abs().max() > 1e-2


# -- official fixtures -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["tiny_clipb", "tiny_clipb_enhanced"])
def test_clip_tower_matches_official_semantic_tokens(shared_dir, case):
    tower, io = fixture_clip(shared_dir, case)
    with torch.no_grad():
        tokens = tower(io["input.images"], grid=8)
    # Measured 1.2e-6 for both cases (the fixtures' float32 floor is 1.7e-6 / 1.9e-6).
    torch.testing.assert_close(tokens, io["encode.sem_tokens"], atol=ATOL, rtol=0)


def test_clip_enhanced_fixture_needs_the_official_interpolation(shared_dir, monkeypatch):
    """tiny_clipb_enhanced runs a 6x6 table at grid 8; a plain resize to size=8 must miss the outputs."""
    tower, io = fixture_clip(shared_dir, "tiny_clipb_enhanced")
    assert tower.model.positional_embedding.shape[0] == 6 * 6 + 1

    def resize(table, grid):
        n, dim = int(table.shape[0] ** 0.5), table.shape[1]
        sq = table.reshape(1, n, n, dim).permute(0, 3, 1, 2)
        return F.interpolate(sq, size=(grid, grid), mode="bicubic").permute(0, 2, 3, 1).reshape(-1, dim)

    monkeypatch.setattr(vision_towers, "interpolate_position_table", resize)
    with torch.no_grad():
        tokens = tower(io["input.images"], grid=8)
    assert (tokens - io["encode.sem_tokens"]).abs().max() > 1e-3


def test_siglip_tower_matches_official_semantic_tokens(shared_dir):
    state, io, ov = load_fixture(shared_dir, "tiny_siglip")
    tower = build_vision_tower("siglip", config=ov["config"])
    tower.load_state_dict(state, strict=True)
    tower.eval()
    # The official scaling layer is a clamp to [-1, 1]: bit for bit the stored SigLIP input.
    assert torch.equal(official_input_scaling(io["input.images"], (0.5,) * 3, (0.5,) * 3), io["encode.sem_input"])
    with torch.no_grad():
        from_sem_input = tower(io["encode.sem_input"], grid=4)
        from_images = tower(io["input.images"])
    # Measured 0 (same sdpa kernels on CPU); the fixture's float32 floor is 1.9e-6.
    torch.testing.assert_close(from_sem_input, io["encode.sem_tokens"], atol=ATOL, rtol=0)
    torch.testing.assert_close(from_images, io["encode.sem_tokens"], atol=ATOL, rtol=0)


def test_key_mapping_round_trips_the_official_names(shared_dir):
    state, _, _ = load_fixture(shared_dir, "tiny_siglip")
    ours = set(state)
    assert "model.embeddings.patch_embedding.weight" in ours and "model.head.probe" in ours
    assert {official_key_to_ours(ours_key_to_official(k)) for k in ours} == ours
    # A checkpoint saved under transformers 4.x nests the tower in `vision_model`.
    assert official_key_to_ours("vision_model.post_layernorm.weight") == "model.post_layernorm.weight"
    with pytest.raises(KeyError):
        ours_key_to_official("conv1.weight")


# -- behaviour -----------------------------------------------------------------------------------------

def test_clip_projection_and_drop_projection():
    tower = ClipVisionTower(config=TINY_CLIP).eval()
    assert (tower.grid_for(32), tower.width, tower.out_dim) == (8, 64, 64)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        tokens = tower(images)
        projected = tower(images, project=True)
    assert tokens.shape == (2, 64, 64) and projected.shape == (2, 64, TINY_CLIP["output_dim"])
    torch.testing.assert_close(projected, tokens @ tower.model.proj)
    assert ClipVisionTower(config=TINY_CLIP, project=True).out_dim == TINY_CLIP["output_dim"]

    tower.drop_projection()
    assert "model.proj" not in tower.state_dict()
    with pytest.raises(ValueError, match="projection was dropped"):
        tower(images, project=True)


def test_grid_mismatch_and_wrong_siglip_size_are_rejected():
    clip = ClipVisionTower(config=TINY_CLIP)
    with pytest.raises(ValueError, match="grid=7"):
        clip(torch.zeros(1, 3, 32, 32), grid=7)
    siglip = SiglipVisionTower(config=TINY_SIGLIP)
    with pytest.raises(ValueError, match="native 28 px"):
        siglip(torch.zeros(1, 3, 42, 42))
    with pytest.raises(ValueError, match="unknown vision tower kind"):
        build_vision_tower("eva")


def test_siglip_freezes_exactly_the_parameters_that_cannot_reach_the_tokens():
    tower = SiglipVisionTower(config=TINY_SIGLIP)
    tower(torch.rand(1, 3, 28, 28) * 2 - 1).square().sum().backward()
    for name, param in tower.named_parameters():
        # Trainable <=> gets a gradient: no parameter DDP would wait for in vain, none frozen needlessly.
        assert param.requires_grad == (param.grad is not None), name
    assert not tower.model.encoder.layers[2].mlp.fc1.weight.requires_grad
    assert tower.model.encoder.layers[1].mlp.fc1.weight.requires_grad


def test_timm_tower_drops_prefix_tokens():
    tower = build_vision_tower("timm", name="vit_tiny_patch16_224",
                               config=dict(img_size=32, depth=1, embed_dim=32, num_heads=2)).eval()
    assert tower.grid_for(32) == 2
    assert tower(torch.zeros(2, 3, 32, 32)).shape == (2, 4, 32)


# -- loading pretrained weights ----------------------------------------------------------------------

def test_clip_tower_reloads_from_a_local_state_dict_file(tmp_path):
    tower = ClipVisionTower(config=TINY_CLIP).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.save(tower.state_dict(), tmp_path / "clip.pt")
    reloaded = build_vision_tower("openai_clip", pretrained=str(tmp_path / "clip.pt"), config={"heads": 2}).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(images, project=True), tower(images, project=True))

    # Official (bare) names without proj, as a TokenFlow semantic encoder stores them, in a folder.
    from safetensors.torch import save_file

    tower.drop_projection()
    (tmp_path / "folder").mkdir()
    save_file({ours_key_to_official(k): v for k, v in tower.state_dict().items()},
              str(tmp_path / "folder" / "model.safetensors"))
    reloaded = build_vision_tower("openai_clip", pretrained=str(tmp_path / "folder"), config={"heads": 2}).eval()
    assert reloaded.model.proj is None
    with torch.no_grad():
        assert torch.equal(reloaded(images), tower(images))


def test_siglip_tower_reloads_from_a_file_and_a_folder(tmp_path):
    tower = SiglipVisionTower(config=TINY_SIGLIP).eval()
    images = torch.rand(2, 3, 28, 28) * 2 - 1
    torch.save(tower.state_dict(), tmp_path / "siglip.pt")
    from_file = build_vision_tower("siglip", pretrained=str(tmp_path / "siglip.pt"), config=TINY_SIGLIP).eval()
    tower.model.save_pretrained(tmp_path / "hf")
    from_folder = build_vision_tower("siglip", pretrained=str(tmp_path / "hf")).eval()
    with torch.no_grad():
        expected = tower(images)
        assert torch.equal(from_file(images), expected)
        assert torch.equal(from_folder(images), expected)


def test_timm_tower_reloads_from_a_local_file(tmp_path):
    cfg = dict(img_size=32, depth=1, embed_dim=32, num_heads=2)
    tower = build_vision_tower("timm", name="vit_tiny_patch16_224", config=cfg).eval()
    torch.save(tower.model.state_dict(), tmp_path / "vit.pt")
    reloaded = build_vision_tower("timm", name="vit_tiny_patch16_224", pretrained=str(tmp_path / "vit.pt"),
                                  config=cfg).eval()
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(reloaded(images), tower(images))


def _offline(monkeypatch):
    """Offline whatever the environment says: a known model name must not start a download."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("pretrained", ["/nonexistent/clip_visual.pt", "not-an-open-clip-model"])
def test_clip_missing_weights_name_the_config_key(pretrained):
    with pytest.raises(MissingWeightsError, match=KEY):
        build_vision_tower("openai_clip", pretrained=pretrained, config_key=KEY)


def test_clip_known_name_offline_with_empty_cache_raises_clear_error(tmp_path, monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(MissingWeightsError, match=f"{KEY}.*local state-dict file"):
        build_vision_tower("openai_clip", pretrained="ViT-B-16/openai", config_key=KEY, cache_dir=str(tmp_path))


@pytest.mark.parametrize("pretrained", ["/nonexistent/siglip", "no-such-org/siglip-missing",
                                        "google/siglip-so400m-patch14-384"])
def test_siglip_missing_weights_name_the_config_key(pretrained, tmp_path, monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(MissingWeightsError, match=KEY):
        build_vision_tower("siglip", pretrained=pretrained, config_key=KEY, cache_dir=str(tmp_path))
