"""Tiny checkpoints in the layout `TokenizerModule` saves, for every registered model type."""

from pathlib import Path

import pytest
import torch

from tokenizers_vis import build_tokenizer

_TITOK = dict(model_type="titok", image_size=32, patch_size=8, num_latent_tokens=8, encoder_size=None,
              decoder_size=None, encoder_width=32, encoder_depth=1, encoder_heads=2, decoder_width=32,
              decoder_depth=1, decoder_heads=2)

# Tiny configs by name. Every registered model type needs at least one (checked by
# test_every_registered_model_type_has_a_tiny_config): a new model type adds its own here and
# every export test then runs for it.
TINY_CONFIGS = {
    "titok_vq": {**_TITOK, "quantizer": "vq", "token_dim": 8, "codebook_size": 64},
    "titok_vae": {**_TITOK, "quantizer": "vae", "token_dim": 8},
    "vqgan": dict(model_type="vqgan", image_size=32, base_channels=8, channel_mult=[1, 2], num_res_blocks=1,
                  z_channels=8, codebook_size=32, norm_groups=4),
    "flextok": dict(model_type="flextok", image_size=32, vae=None, patch_size=8, num_registers=8, encoder_width=32,
                    encoder_depth=1, encoder_heads=2, decoder_width=32, decoder_depth=1, decoder_heads=2,
                    sample_steps=2, guidance_scale=1.5),
    "tokenflow": dict(model_type="tokenflow", image_size=32, semantic_decoder_width=32, semantic_decoder_depth=1,
                      semantic_decoder_heads=2, semantic_out_dim=16, pixel_channels=32,
                      pixel_channel_mult=[1, 1, 1, 1], pixel_num_res_blocks=1, z_channels=32, codebook_size=32,
                      scales=[1, 2, 4], semantic_encoder={"kind": "openai_clip", "pretrained": None, "config": {
                          "image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2, "output_dim": 16}}),
    "seed": dict(model_type="seed", image_size=32, vit={"patch_size": 8, "width": 24, "depth": 1, "heads": 2,
                 "mlp_ratio": 2.0}, qformer_width=24, qformer_depth=2, qformer_heads=2, qformer_mlp_dim=48,
                 qformer_dropout=0.0, num_queries=32, codebook_size=64, code_dim=8, decode_depth=1,
                 image_embed_dim=32, text_branch=False,
                 unclip={"pretrained": None, "dtype": None, "config": {
                     "embed_dim": 32, "sample_size": 16, "unet_channels": [32, 64], "vae_channels": [16, 16],
                     "text_width": 32, "text_layers": 1, "vision_width": 32, "vision_layers": 1,
                     "vision_image_size": 32}}),
    "divot": dict(model_type="divot", num_frames=1, frame_stride=1, image_size=32, vit_image_size=28, video_size=32,
                  frame_vit={"pretrained": None, "config": {"image_size": 28, "patch_size": 14, "width": 16,
                                                            "layers": 1, "head_width": 8, "output_dim": 8}},
                  temporal_width=16, temporal_depth=1, temporal_heads=2, hidden_size=16, pool_size=2, st_depth=1,
                  st_heads=2, num_tokens=4, token_dim=8, resampler_depth=1, resampler_heads=2,
                  resampler_head_dim=8, context_tokens=6, context_dim=32, context_depth=1, context_heads=2,
                  context_head_dim=16, unet={"model_channels": 32, "channel_mult": [1], "num_res_blocks": 1,
                                             "attention_resolutions": [1], "num_head_channels": 16, "dropout": 0.0},
                  vae={"pretrained": None, "config": {"block_out_channels": [8, 8], "layers_per_block": 1,
                                                      "latent_channels": 4, "norm_num_groups": 8,
                                                      "down_block_types": ["DownEncoderBlock2D"] * 2,
                                                      "up_block_types": ["UpDecoderBlock2D"] * 2}},
                  sample_steps=2),
    "layton": dict(model_type="layton", image_size=32, tokenizer_input_size=32, encoder_channels=32,
                   encoder_channel_mult=[1, 1, 2], encoder_num_res_blocks=1, z_channels=16, codebook_size=64,
                   cond_embedding_widths=[8, 16], lora_rank=4, unet={"pretrained": None, "config": {
                       "sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [16, 32],
                       "layers_per_block": 1, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                       "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
                       "mid_block_type": "UNetMidBlock2DCrossAttn", "attention_head_dim": [2, 4],
                       "use_linear_projection": True, "cross_attention_dim": 32, "addition_embed_type": "text_time",
                       "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 1328,
                       "norm_num_groups": 8}},
                   vae={"pretrained": None, "config": {
                       "block_out_channels": [16, 16], "layers_per_block": 1, "norm_num_groups": 8,
                       "latent_channels": 4, "down_block_types": ["DownEncoderBlock2D"] * 2,
                       "up_block_types": ["UpDecoderBlock2D"] * 2, "scaling_factor": 1.0}}),
}


def write_checkpoint(path: Path, config: dict, step: int = 7, ema: bool = True) -> Path:
    """A checkpoint with `tokenizer.*` (raw) and `ema.*` weights that differ, the module's step
    buffers, and the entries Lightning adds."""
    raw = build_tokenizer(config)
    state = {f"tokenizer.{k}": v for k, v in raw.state_dict().items()}
    if ema:
        averaged = build_tokenizer(config)
        averaged.load_state_dict(raw.state_dict())
        with torch.no_grad():
            for p in averaged.parameters():
                p.add_(0.01 * torch.randn_like(p))
        state.update({f"ema.{k}": v for k, v in averaged.state_dict().items()})
    state.update({"step": torch.tensor(step), "nonfinite_steps": torch.tensor(0)})
    checkpoint = {"epoch": 0, "global_step": step, "state_dict": state, "tokenizer_config": raw.config,
                  "hyper_parameters": {"ema_decay": 0.999 if ema else None}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


@pytest.fixture
def tiny_configs() -> dict:
    return TINY_CONFIGS


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_config(request) -> dict:
    return TINY_CONFIGS[request.param]


@pytest.fixture
def checkpoint_writer():
    return write_checkpoint


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    """<tmp>/run/checkpoints/last.ckpt of a tiny VQ TiTok."""
    return write_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", TINY_CONFIGS["titok_vq"])
