"""Layton's two training stages (the release ships no training code; the recipe is the paper's).

Stage 1, `LaytonDiffusionObjective`: the decoder learns to denoise the VAE latents of the image
conditioned on its tokens: eps-MSE at uniform timesteps (the UNet base is frozen; the ControlNet,
the conditioning embedding and the LoRA train, and the tokenizer half when it is not frozen). On its
own this leaves colour and brightness shifts in few-step decodes.

Stage 2, `LaytonConsistencyObjective`: the decoder becomes a latent consistency decoder. From pure
noise at t = 999 it predicts x0 in one call (steps=1), or in two calls 999 -> 499 with the first
under stop-gradient (steps=2); x0 goes through the frozen VAE decoder, and LPIPS + L2 on the pixels
supervise it. The gradients go back through the VAE decoder, the UNet and the ControlNet into the
token branch.

Both are `Objective`s (losses/base.py): `forward(model, batch, step) -> (loss, logs, output)`; the
model is a `models.layton.Layton`. Pixel losses are on our [0, 1] scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_vis.losses.base import Batch, Objective, batch_pixels, detached
from tokenizers_vis.losses.perceptual import LPIPSLoss
from tokenizers_vis.models.base import ModelOutput

PIXEL_LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss}


def _check_weights(**weights: float) -> None:
    negative = {k: v for k, v in weights.items() if v < 0}
    if negative:
        raise ValueError(f"loss weights must be >= 0, got {negative}")


class LaytonDiffusionObjective(Objective):
    """Stage 1: loss = diffusion_weight * mse(eps_pred, eps) + aux_weight * (VQ loss when the tokenizer trains).

    cond_scale: the ControlNet scale in training (1: the residuals as they are).
    sample_posterior: regress on a sample of the VAE posterior (True) or its mean.
    The returned reconstruction is the one-call x0 estimate of this step through the VAE, without
    gradients (for logs; it costs one VAE decode).
    """

    def __init__(self, diffusion_weight: float = 1.0, aux_weight: float = 1.0, cond_scale: float = 1.0,
                 sample_posterior: bool = True):
        super().__init__()
        _check_weights(diffusion_weight=diffusion_weight, aux_weight=aux_weight)
        self.diffusion_weight = diffusion_weight
        self.aux_weight = aux_weight
        self.cond_scale = cond_scale
        self.sample_posterior = sample_posterior

    def forward(self, model: nn.Module, batch: Batch | torch.Tensor, step: int):
        images = batch_pixels(batch)
        encoded = model.encode(images)
        code_map = model.code_map(encoded)
        posterior_noise = None
        if self.sample_posterior and model.vae is not None:
            posterior_noise = torch.randn(model.latent_shape(images.shape[0]), device=images.device)
        latents = model.target_latents(images, posterior_noise)
        train = model.decoder.training_step(latents, model.condition(code_map, self.cond_scale))
        diffusion = F.mse_loss(train.prediction.float(), train.target.float())
        aux = model.quantizer_loss(encoded)
        loss = self.diffusion_weight * diffusion + self.aux_weight * aux
        with torch.no_grad():
            x0 = model.decoder.predict_x0(train.prediction.detach(), train.x_t, train.timesteps)
            reconstruction = model.latents_to_pixels(x0, clip=False)
        logs = {"loss/diffusion": diffusion, "loss/total": loss, **model.quantizer_logs(encoded)}
        output = ModelOutput(reconstruction=reconstruction, aux_loss=aux, logs=detached(logs), encoded=encoded)
        return loss, detached(logs), output

    def extra_repr(self) -> str:
        return f"diffusion_weight={self.diffusion_weight}, aux_weight={self.aux_weight}, cond_scale={self.cond_scale}"


class LaytonConsistencyObjective(Objective):
    """Stage 2: loss = pixel_weight * pixel(x, D(x0)) + lpips_weight * LPIPS(x, D(x0)) + aux_weight * VQ loss,
    where x0 is the consistency sampler's prediction from noise in `steps` calls (1, or 2 with the
    first under stop-gradient when `stop_gradient`) and D the frozen VAE decoder.

    timesteps: the model timesteps (None: the release schedule's first `steps`: 999 / 999, 499).
    random_perceptual_weights / lpips_weights: LPIPS's VGG16 (random for smoke runs; a local file).
    """

    def __init__(self, steps: int = 1, stop_gradient: bool = True, timesteps: list[int] | None = None,
                 pixel_loss: str = "l2", pixel_weight: float = 1.0, lpips_weight: float = 1.0,
                 aux_weight: float = 1.0, cond_scale: float = 1.0, random_perceptual_weights: bool = False,
                 lpips_weights: str | None = None):
        super().__init__()
        if pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {sorted(PIXEL_LOSSES)}, got {pixel_loss!r}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if timesteps is not None and len(timesteps) != steps:
            raise ValueError(f"timesteps {list(timesteps)} must list one timestep per step ({steps})")
        _check_weights(pixel_weight=pixel_weight, lpips_weight=lpips_weight, aux_weight=aux_weight)
        self.steps = steps
        self.stop_gradient = stop_gradient
        self.timesteps = list(timesteps) if timesteps is not None else None
        self.pixel_loss = pixel_loss
        self.pixel_weight = pixel_weight
        self.lpips_weight = lpips_weight
        self.aux_weight = aux_weight
        self.cond_scale = cond_scale
        if lpips_weight > 0:
            self.add_frozen("lpips", LPIPSLoss(random_backbone=random_perceptual_weights, vgg_weights=lpips_weights))

    def reconstruct(self, model: nn.Module, images: torch.Tensor):
        """(Encoded, unclipped [0, 1] reconstruction) with gradients through the last sampler call."""
        encoded = model.encode(images)
        times = self.timesteps or model.sampling_timesteps(self.steps)
        latents = model.sample_latents(model.code_map(encoded), cond_scale=self.cond_scale, timesteps=times,
                                       grad_steps=1 if self.stop_gradient else None)
        return encoded, model.latents_to_pixels(latents, clip=False)

    def forward(self, model: nn.Module, batch: Batch | torch.Tensor, step: int):
        images = batch_pixels(batch)
        encoded, reconstruction = self.reconstruct(model, images)
        pixel = PIXEL_LOSSES[self.pixel_loss](reconstruction.float(), images.float())
        aux = model.quantizer_loss(encoded)
        loss = self.pixel_weight * pixel + self.aux_weight * aux
        logs = {"loss/pixel": pixel}
        if self.lpips_weight > 0:
            perceptual = self.frozen["lpips"](reconstruction.float(), images.float())
            loss = loss + self.lpips_weight * perceptual
            logs["loss/lpips"] = perceptual
        logs.update({"loss/total": loss, **model.quantizer_logs(encoded)})
        output = ModelOutput(reconstruction=reconstruction, aux_loss=aux, logs=detached(logs), encoded=encoded)
        return loss, detached(logs), output

    def extra_repr(self) -> str:
        return (f"steps={self.steps}, stop_gradient={self.stop_gradient}, pixel_loss={self.pixel_loss}, "
                f"pixel_weight={self.pixel_weight}, lpips_weight={self.lpips_weight}")
