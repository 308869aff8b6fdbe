"""Pictures of reconstructions: the grid training logs and the evaluator writes look the same.

Accepts the data contract's images (B, 3, H, W) and video (B, T, 3, H, W), in [0, 1].
"""

from __future__ import annotations

import torch
from torchvision.utils import make_grid


def reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, padding: int = 2) -> torch.Tensor:
    """One (3, H', W') image, clamped to [0, 1], white padding.

    Images: originals in the top row, reconstructions below. Video: two rows per clip, its
    original frames left to right, then the reconstructed frames under them.
    """
    if originals.shape != reconstructions.shape:
        raise ValueError(f"originals {tuple(originals.shape)} and reconstructions {tuple(reconstructions.shape)} "
                         "must have the same shape")
    if originals.dim() == 4:
        rows, per_row = torch.cat([originals, reconstructions], dim=0), originals.shape[0]
    elif originals.dim() == 5:
        # (B, 2, T, 3, H, W): each clip's original frames, then its reconstructed frames.
        rows, per_row = torch.stack([originals, reconstructions], dim=1).flatten(0, 2), originals.shape[1]
    else:
        raise ValueError(f"expected images (B, 3, H, W) or video (B, T, 3, H, W), got {tuple(originals.shape)}")
    return make_grid(rows.float().cpu().clamp(0, 1), nrow=per_row, padding=padding, pad_value=1.0)
