"""Semantic distillation: reconstruction objective + 1 - cosine(predicted, frozen teacher) features.

TokenFlow's semantic branch decodes its codes back to the teacher's feature space; the loss pulls
those predictions towards the features the frozen, pretrained teacher computes for the same image.
The teacher is built by the model (`model.build_teacher()`: the same pretrained weights, or for
random tiny models the same seed, the tower started from) when the training module calls
`prepare(model)`, and sits in `frozen`, which checkpoints leave out: a resumed run rebuilds the
same teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_vis.losses.base import Batch, batch_pixels
from tokenizers_vis.losses.objective import ReconstructionObjective
from tokenizers_vis.nn.pretrained import FrozenModule


class FrozenTeacher(FrozenModule):
    """A vision tower that gives distillation targets: no gradients, always in eval mode."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower
        self._freeze()

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: int) -> torch.Tensor:
        return self.tower(images, grid=grid, project=True) if hasattr(self.tower, "drop_projection") \
            else self.tower(images, grid=grid)


class DistillationObjective(ReconstructionObjective):
    """ReconstructionObjective + distill_weight * (1 - mean cosine(model semantic features, teacher)).

    The model's `forward` puts its predicted teacher features in `output.encoded.extras["semantic"]`
    (B, N, D) and provides `semantic_input(images)`, `grid` and `build_teacher()`.
    """

    def __init__(self, distill_weight: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if distill_weight < 0:
            raise ValueError(f"distill_weight must be >= 0, got {distill_weight}")
        self.distill_weight = distill_weight

    def prepare(self, model: nn.Module) -> None:
        """Build the frozen teacher from the model (TokenizerModule calls this before training)."""
        if self.distill_weight > 0 and "teacher" not in self.frozen:
            self.add_frozen("teacher", FrozenTeacher(model.build_teacher()))

    def teacher(self, model: nn.Module, device: torch.device) -> FrozenTeacher:
        if "teacher" not in self.frozen:
            self.prepare(model)
            self.frozen["teacher"].to(device)
        return self.frozen["teacher"]

    def forward(self, model: nn.Module, batch: Batch | torch.Tensor, step: int):
        loss, logs, output = super().forward(model, batch, step)
        images = batch_pixels(batch)
        predicted = output.encoded.extras.get("semantic")  # None: the semantic branch is frozen (stage 2)
        if self.distill_weight > 0 and predicted is not None:
            target = self.teacher(model, images.device)(model.semantic_input(images), model.grid)
            if target.shape != predicted.shape:
                raise ValueError(f"the teacher gives features {tuple(target.shape)} but the model predicts "
                                 f"{tuple(predicted.shape)}; set model semantic_out_dim={target.shape[-1]}")
            distill = 1 - F.cosine_similarity(predicted.float(), target.float(), dim=-1).mean()
            loss = loss + self.distill_weight * distill
            logs["loss/distill"] = distill.detach()
            logs["loss/total"] = loss.detach()
        return loss, logs, output

    def extra_repr(self) -> str:
        return super().extra_repr() + f", distill_weight={self.distill_weight}"
