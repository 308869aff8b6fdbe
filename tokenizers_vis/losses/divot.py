"""Divot's training objective (the release has no training code; the recipe is the paper's).

`DivotDenoisingObjective`: the 3D UNet learns to denoise the VAE latents of the clip's dense frames
(all 16) conditioned on the tokens of its 5 sparse frames: v-prediction MSE at uniform timesteps of
the zero-terminal-SNR schedule. The frozen frame ViT and VAE never train; the temporal encoder, the
spatial-temporal transformer, both Perceiver resamplers and the UNet do (or what `freeze_parts`
leaves trainable). With probability `condition_dropout` (the model's) a clip is trained on the
context of an all-zero video, the unconditional input of classifier-free guidance.
The returned reconstruction is the one-call x0 estimate of this step through the VAE, without
gradients (for logs), when `log_reconstruction`; otherwise None (the step trains no pixel path).
"""

from __future__ import annotations

import torch
from torch import nn

from tokenizers_vis.losses.base import Batch, Objective, batch_pixels, detached
from tokenizers_vis.models.base import ModelOutput


class DivotDenoisingObjective(Objective):
    """loss = diffusion_weight * mse(v_pred, v) on the dense frames' latents, conditioned on the tokens."""

    def __init__(self, diffusion_weight: float = 1.0, log_reconstruction: bool = False):
        super().__init__()
        if diffusion_weight <= 0:
            raise ValueError(f"diffusion_weight must be > 0, got {diffusion_weight}")
        self.diffusion_weight = diffusion_weight
        self.log_reconstruction = log_reconstruction

    def forward(self, model: nn.Module, batch: Batch | torch.Tensor, step: int):
        pixels = batch_pixels(batch)
        video = model.as_clip(pixels)
        train, tokens = model.denoising_step(video)
        diffusion = torch.nn.functional.mse_loss(train.prediction.float(), train.target.float())
        loss = self.diffusion_weight * diffusion
        logs = {"loss/diffusion": diffusion, "loss/total": loss, "tokens/std": tokens.detach().float().std()}
        reconstruction = None
        if self.log_reconstruction:
            with torch.no_grad():
                x0 = model.decoder.predict_x0(train.prediction.detach(), train.x_t, train.timesteps)
                reconstruction = model.from_clip(((model.decode_latents(x0) + 1) / 2), pixels)
        output = ModelOutput(reconstruction=reconstruction, aux_loss=torch.zeros((), device=loss.device),
                             logs=detached(logs))
        return loss, detached(logs), output

    def extra_repr(self) -> str:
        return f"diffusion_weight={self.diffusion_weight}, log_reconstruction={self.log_reconstruction}"
