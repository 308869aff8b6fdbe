"""The training objective of pixel-reconstruction tokenizers: pixel + perceptual + model aux + GAN.

Submodules, by role (see `losses.base.Objective` for the hooks the training module calls):
  frozen         ModuleDict of frozen pretrained nets (LPIPS, ConvNeXt); kept out of checkpoints.
  discriminator  the GAN discriminator, or None; trained by its own optimizer via `discriminator_loss`.
  lecam          the LeCam EMA buffers, or None.
A term whose weight is 0 builds no network.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_vis.losses import gan
from tokenizers_vis.losses.base import Batch, Objective, batch_pixels, detached
from tokenizers_vis.losses.discriminator import build_discriminator
from tokenizers_vis.losses.perceptual import ConvNeXtPerceptualLoss, LPIPSLoss

if TYPE_CHECKING:  # only for annotations: keeps losses importable without the model registry
    from tokenizers_vis.models.base import ModelOutput

PIXEL_LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss}


@contextmanager
def _no_parameter_grads(module: nn.Module) -> Iterator[None]:
    """Build graphs through `module` that reach its input but record no gradient for its parameters.

    Autograd decides at forward time which leaves get gradients, so restoring the flags afterwards
    is safe: a later backward of this graph still leaves the module's `.grad`s untouched.
    """
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in zip(module.parameters(), flags):
            param.requires_grad_(flag)


class ReconstructionObjective(Objective):
    """loss = pixel_weight * pixel + lpips_weight * lpips + convnext_weight * convnext + aux_weight * aux
    + gan_weight * [adaptive weight] * hinge_g(D(reconstruction))   (GAN from `gan_start_step` on).

    Images and reconstructions are on the [0, 1] scale. `forward` is the generator objective;
    `discriminator_loss` is the discriminator's (hinge + lecam_weight * LeCam).
    """

    def __init__(
        self,
        pixel_loss: str = "l2",
        pixel_weight: float = 1.0,
        lpips_weight: float = 1.0,
        convnext_weight: float = 0.0,
        aux_weight: float = 1.0,
        gan_weight: float = 0.1,
        gan_start_step: int = 0,
        lecam_weight: float = 0.0,
        lecam_decay: float = 0.999,
        adaptive_gan_weight: bool = False,
        discriminator: str | None = "titok",
        discriminator_kwargs: Mapping[str, Any] | None = None,
        random_perceptual_weights: bool = False,
        lpips_weights: str | None = None,
        convnext_weights: str | None = None,
        adaptive_gan_weight_max: float = 1e4,
        download_weights: bool = True,
    ):
        super().__init__()
        if pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {sorted(PIXEL_LOSSES)}, got {pixel_loss!r}")
        weights = {
            "pixel_weight": pixel_weight,
            "lpips_weight": lpips_weight,
            "convnext_weight": convnext_weight,
            "aux_weight": aux_weight,
            "gan_weight": gan_weight,
            "lecam_weight": lecam_weight,
        }
        negative = {k: v for k, v in weights.items() if v < 0}
        if negative:
            raise ValueError(f"loss weights must be >= 0, got {negative}")
        if gan_start_step < 0:
            raise ValueError(f"gan_start_step must be >= 0, got {gan_start_step}")

        self.pixel_loss = pixel_loss
        self.pixel_weight = pixel_weight
        self.lpips_weight = lpips_weight
        self.convnext_weight = convnext_weight
        self.aux_weight = aux_weight
        self.gan_weight = gan_weight
        self.gan_start_step = gan_start_step
        self.lecam_weight = lecam_weight
        self.use_adaptive_gan_weight = adaptive_gan_weight
        self.adaptive_gan_weight_max = adaptive_gan_weight_max

        if lpips_weight > 0:
            self.add_frozen("lpips", LPIPSLoss(random_backbone=random_perceptual_weights, vgg_weights=lpips_weights,
                                               download=download_weights))
        if convnext_weight > 0:
            self.add_frozen("convnext", ConvNeXtPerceptualLoss(
                random_backbone=random_perceptual_weights, weights=convnext_weights, download=download_weights
            ))

        use_gan = discriminator is not None and gan_weight > 0
        self.discriminator = build_discriminator(discriminator, **dict(discriminator_kwargs or {})) if use_gan else None
        self.lecam = gan.LeCamRegularizer(lecam_decay) if use_gan and lecam_weight > 0 else None

    def discriminator_active(self, step: int) -> bool:
        """Whether the GAN terms (generator and discriminator) are on at this training step."""
        return self.discriminator is not None and step >= self.gan_start_step

    def forward(
        self, model: nn.Module, batch: Batch | torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], ModelOutput]:
        """Generator objective. Returns (loss, detached logs, the model's output)."""
        images = batch_pixels(batch)
        output: ModelOutput = model(images)
        # Losses in float32 on the raw (unclamped) reconstruction, whatever autocast the model ran in.
        reconstruction = output.reconstruction.float()
        target = images.float()
        logs: dict[str, torch.Tensor] = {}

        # Reconstruction ("nll") terms: the part the adaptive GAN weight balances against.
        nll = reconstruction.new_zeros(())
        if self.pixel_weight > 0:
            pixel = PIXEL_LOSSES[self.pixel_loss](reconstruction, target)
            nll = nll + self.pixel_weight * pixel
            logs["loss/pixel"] = pixel
        for name, weight in (("lpips", self.lpips_weight), ("convnext", self.convnext_weight)):
            if name in self.frozen:
                term = self.frozen[name](reconstruction, target)
                nll = nll + weight * term
                logs[f"loss/{name}"] = term

        loss = nll
        if self.aux_weight > 0:
            aux = output.aux_loss.float()
            loss = loss + self.aux_weight * aux
            logs["loss/aux"] = aux

        if self.discriminator_active(step):
            with _no_parameter_grads(self.discriminator):
                g_loss = gan.hinge_g_loss(self.discriminator(output.reconstruction))
            loss = loss + self.gan_weight * self._gan_balance(model, nll, g_loss, logs) * g_loss
            logs["loss/gan_g"] = g_loss

        logs["loss/total"] = loss
        logs.update(output.logs)
        return loss, detached(logs), output

    def _gan_balance(
        self, model: nn.Module, nll: torch.Tensor, g_loss: torch.Tensor, logs: dict[str, torch.Tensor]
    ) -> torch.Tensor | float:
        """The adaptive factor on the generator GAN loss, or 1 when it is off.

        Without autograd (evaluation under no_grad) the factor cannot be measured and is 1.
        """
        if not (self.use_adaptive_gan_weight and torch.is_grad_enabled()):
            return 1.0
        last_layer = model.last_layer_weight()
        if last_layer is None:
            raise ValueError(
                f"adaptive_gan_weight=True needs the model's last_layer_weight(), "
                f"but {type(model).__name__}.last_layer_weight() returns None"
            )
        weight = gan.adaptive_gan_weight(nll, g_loss, last_layer, max_weight=self.adaptive_gan_weight_max)
        logs["gan/adaptive_weight"] = weight
        return weight

    def discriminator_loss(
        self, images: torch.Tensor, reconstructions: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Discriminator objective: hinge loss (+ lecam_weight * LeCam). Gradients reach only D.

        Call it only where `discriminator_active(step)`; elsewhere there is nothing to train.
        """
        if not self.discriminator_active(step):
            reason = (
                "this objective has no discriminator"
                if self.discriminator is None
                else f"step {step} is before gan_start_step={self.gan_start_step}"
            )
            raise RuntimeError(f"discriminator_loss called but {reason}; check discriminator_active(step) first")
        real_logits = self.discriminator(images)
        fake_logits = self.discriminator(reconstructions.detach())
        loss = gan.hinge_d_loss(real_logits, fake_logits)
        logs = {"loss/disc": loss}
        if self.lecam is not None:
            lecam = self.lecam(real_logits, fake_logits)
            loss = loss + self.lecam_weight * lecam
            logs["loss/lecam"] = lecam
        logs["disc/logits_real"] = real_logits.float().mean()
        logs["disc/logits_fake"] = fake_logits.float().mean()
        return loss, detached(logs)

    def extra_repr(self) -> str:
        return (
            f"pixel_loss={self.pixel_loss}, pixel_weight={self.pixel_weight}, lpips_weight={self.lpips_weight}, "
            f"convnext_weight={self.convnext_weight}, aux_weight={self.aux_weight}, gan_weight={self.gan_weight}, "
            f"gan_start_step={self.gan_start_step}, lecam_weight={self.lecam_weight}, "
            f"adaptive_gan_weight={self.use_adaptive_gan_weight}"
        )
