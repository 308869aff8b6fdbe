"""`Objective`: the base of every training objective, and the hooks the training module calls.

An objective turns a batch into the tokenizer's loss. The training module (training/module.py)
drives every objective through these members only, never by probing for attributes:

  initial_weights(tokenizer)  weights the objective supplies before training starts ({}: none)
  prepare(tokenizer)          build parts derived from the model (a frozen teacher); after the
                              initial weights, before the EMA copy
  forward(tokenizer, batch, step) -> (loss, detached logs, ModelOutput)
  discriminator               the GAN discriminator (its own optimizer), or None
  discriminator_active(step)  whether the discriminator trains at this step
  discriminator_loss(real, reconstruction, step) -> (loss, detached logs)
  frozen                      ModuleDict of frozen pretrained nets (LPIPS, teachers): always in
                              eval mode, no gradients, and never saved in checkpoints (they are
                              rebuilt from config); `unsaved_prefixes()` names them for the module

A batch is the data contract's dict (models/base.py): `{"image": (B, 3, H, W)}` or
`{"video": (B, T, 3, H, W)}` in [0, 1], plus optional `"text"` (list of str) and `"key"`. A bare
tensor is taken as its images, so an objective can be called by hand on images.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tokenizers_vis.models.base import Batch, ModelOutput, as_batch, batch_pixels

__all__ = ["Batch", "Objective", "as_batch", "batch_pixels", "detached"]


def detached(logs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in logs.items()}


class Objective(nn.Module, ABC):
    """Base of every training objective: no discriminator, no frozen parts, no initial weights."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.ModuleDict()
        self.discriminator: nn.Module | None = None

    # -- what the training module calls ----------------------------------------------------------
    @abstractmethod
    def forward(self, tokenizer: nn.Module, batch: Batch | torch.Tensor,
                step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], ModelOutput]:
        """Generator objective on one batch: (loss, detached logs, the tokenizer's output)."""

    def initial_weights(self, tokenizer: nn.Module) -> dict[str, torch.Tensor]:
        """Tokenizer weights this objective supplies before training starts (none by default)."""
        return {}

    def prepare(self, tokenizer: nn.Module) -> None:
        """Build the parts that derive from the tokenizer (none by default)."""

    def discriminator_active(self, step: int) -> bool:
        return False

    def discriminator_loss(self, real: torch.Tensor, reconstruction: torch.Tensor,
                           step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise RuntimeError(f"{type(self).__name__} has no discriminator; check discriminator_active(step) first")

    def unsaved_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes (relative to this objective) that checkpoints leave out."""
        return ("frozen.",)

    # -- frozen parts -----------------------------------------------------------------------------
    def add_frozen(self, name: str, module: nn.Module) -> nn.Module:
        """Keep `module` as a frozen part: no gradients, eval mode, out of checkpoints."""
        self.frozen[name] = module.requires_grad_(False).eval()
        return module

    def train(self, mode: bool = True) -> Objective:
        super().train(mode)
        self.frozen.eval()  # frozen nets always run as at inference (no dropout, fixed statistics)
        return self
