"""The training objective of rectified-flow decoders (FlexTok): velocity MSE, plus REPA.

An `Objective` (losses/base.py): `forward(model, batch, step) -> (loss, logs, output)`, no
discriminator. The model supplies `flow_step(images)` (a `FlowStep`: predicted and target
velocity, and, with REPA on, its projected decoder features) and `output_from(step)`.

REPA (Yu et al., 2024): the decoder's patch features at one layer, through the model's MLP
projector, are pulled towards the patch features of a frozen vision encoder (DINOv2) by a
negative cosine similarity; the frozen encoder sits in `frozen` and is kept out of checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_vis.losses.base import Batch, Objective, batch_pixels


class FlowMatchingObjective(Objective):
    """loss = flow_weight * mse(v, eps - x0) + repa_weight * (1 - cos(projected, teacher)).

    repa_encoder: arguments of `tokenizers_vis.nn.pretrained.FrozenVisionEncoder` (used only when
        repa_weight > 0; the model must then have been built with `repa_layer`).
    """

    def __init__(self, flow_weight: float = 1.0, repa_weight: float = 0.0,
                 repa_encoder: Mapping[str, Any] | None = None):
        super().__init__()
        if flow_weight < 0 or repa_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got flow_weight={flow_weight}, repa_weight={repa_weight}")
        self.flow_weight = flow_weight
        self.repa_weight = repa_weight
        if repa_weight > 0:
            from tokenizers_vis.nn.pretrained import FrozenVisionEncoder

            self.add_frozen("repa", FrozenVisionEncoder(**dict(repa_encoder or {})))

    def forward(self, model: nn.Module, batch: Batch | torch.Tensor, step: int):
        images = batch_pixels(batch)
        flow = model.flow_step(images)
        output = model.output_from(flow)
        flow_loss = output.aux_loss.float()
        loss = self.flow_weight * flow_loss
        logs: dict[str, torch.Tensor] = {"loss/flow": flow_loss}
        if self.repa_weight > 0:
            if flow.hidden is None:
                raise ValueError("repa_weight > 0 needs a model built with repa_layer set")
            repa = self.repa_loss(flow.hidden, images)
            loss = loss + self.repa_weight * repa
            logs["loss/repa"] = repa
        logs["loss/total"] = loss
        logs.update(output.logs)
        return loss, {k: v.detach() for k, v in logs.items()}, output

    def repa_loss(self, projected: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """1 - mean cosine similarity between the projected decoder patches and the teacher's
        patch features, resized to the decoder's grid."""
        with torch.no_grad():
            target = self.frozen["repa"](images)  # (B, h, w, C)
        b, n, c = projected.shape
        grid = int(round(n**0.5))
        if target.shape[1:3] != (grid, grid):
            target = F.interpolate(target.permute(0, 3, 1, 2).float(), size=(grid, grid), mode="bilinear",
                                   align_corners=False).permute(0, 2, 3, 1)
        target = target.reshape(b, n, -1).to(projected.dtype)
        if target.shape[-1] != c:
            raise ValueError(f"REPA projector gives {c} features but the teacher has {target.shape[-1]}; "
                             f"set model repa_dim={target.shape[-1]}")
        return 1 - F.cosine_similarity(projected.float(), target.float(), dim=-1).mean()

    def extra_repr(self) -> str:
        return f"flow_weight={self.flow_weight}, repa_weight={self.repa_weight}"
