"""Divot's denoising objective: a tiny random Divot overfits one clip (the loss at a fixed noise draw
and timestep falls by more than 30%), only trainable parts get gradients, and the gradient
checkpointing flag gives the same gradients."""

import torch

from tokenizers_vis.losses.divot import DivotDenoisingObjective
from tokenizers_vis.models.divot import Divot

VIT = {"image_size": 28, "patch_size": 14, "width": 32, "layers": 1, "head_width": 16, "output_dim": 16}
UNET = {"model_channels": 32, "channel_mult": [1, 1], "num_res_blocks": 1, "attention_resolutions": [2],
        "num_head_channels": 16, "dropout": 0.0}
VAE = {"pretrained": None, "scaling_factor": 0.18215, "config": {
    "block_out_channels": [32, 32], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32,
    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2, "sample_size": 16}}


def tiny(**kwargs) -> Divot:
    torch.manual_seed(0)
    args = dict(frame_vit={"pretrained": None, "config": VIT}, image_size=32, vit_image_size=28, video_size=16,
                temporal_width=32, temporal_depth=1, temporal_heads=2, hidden_size=32, pool_size=2, st_depth=1,
                st_heads=2, num_tokens=4, token_dim=8, resampler_depth=1, resampler_heads=2, resampler_head_dim=16,
                context_tokens=6, context_dim=32, context_depth=1, context_heads=2, context_head_dim=16, unet=UNET,
                vae=VAE, condition_dropout=0.0)
    args.update(kwargs)
    return Divot(**args)


def moving_square_clip(frames: int = 16, size: int = 32) -> torch.Tensor:
    """A bright square moving right over a gradient: (1, T, 3, H, W) in [0, 1]."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    clip = torch.stack([x, y, 1 - x], 0).unsqueeze(0).repeat(frames, 1, 1, 1) * 0.5
    for t in range(frames):
        clip[t, :, 8:16, t:t + 8] = 1.0
    return clip.unsqueeze(0)


def _fixed_loss(model: Divot, clip: torch.Tensor) -> torch.Tensor:
    """The loss at one fixed noise draw and timestep (seeded generator)."""
    loss, _ = model.denoising_loss(clip, generator=torch.Generator().manual_seed(3))
    return loss


def test_denoising_loss_falls_overfitting_one_clip():
    model = tiny().train()
    objective = DivotDenoisingObjective()
    clip = moving_square_clip()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    with torch.no_grad():
        before = float(_fixed_loss(model, clip))
    for _ in range(25):
        torch.manual_seed(3)  # the objective draws from the global RNG: the same draw every step
        loss, logs, output = objective(model, {"video": clip}, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(_fixed_loss(model, clip))
    assert set(logs) >= {"loss/diffusion", "loss/total"} and output.reconstruction is None
    with torch.no_grad():
        shown = DivotDenoisingObjective(log_reconstruction=True)(model, {"video": clip}, 0)[2].reconstruction
    assert shown.shape == (1, 16, 3, model.video_size, model.video_size)  # the one-call x0 estimate, decoded
    assert after < 0.7 * before, (before, after)


def test_only_trainable_parts_get_gradients_and_checkpointing_matches():
    clip = moving_square_clip()
    grads = []
    for checkpointing in (False, True):
        model = tiny().train()
        model.set_gradient_checkpointing(checkpointing)
        torch.manual_seed(5)
        loss, _ = model.denoising_loss(clip)
        loss.backward()
        assert all(p.grad is None for p in model.frame_vit.parameters())
        assert all(p.grad is None for p in model.decoder.vae.parameters())
        assert model.decoder.denoiser.out[2].weight.grad.abs().sum() > 0
        assert model.resampler.latents.weight.grad.abs().sum() > 0  # the tokens train through the UNet
        grads.append(model.temporal_encoder.input_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_condition_dropout_swaps_in_the_unconditional_context():
    model = tiny(condition_dropout=1.0).train()
    clip = moving_square_clip()
    other = clip.flip(1)
    torch.manual_seed(7)
    a, _ = model.denoising_loss(clip)
    torch.manual_seed(7)
    b, _ = model.denoising_loss(other)
    # every context is the unconditional one, so only the latents differ; same clip -> same loss
    torch.manual_seed(7)
    c, _ = model.denoising_loss(clip)
    assert torch.equal(a, c) and not torch.equal(a, b)
    model.condition_dropout = 0.0
    torch.manual_seed(7)
    assert not torch.equal(model.denoising_loss(clip)[0], a)
