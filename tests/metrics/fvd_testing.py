"""A tiny random stand-in for the FVD I3D, saved as TorchScript like the released file."""

from pathlib import Path

import torch
from torch import nn

from tokenizers_vis.metrics import I3D_WEIGHTS_FILE


class TinyI3D(nn.Module):
    """The I3D call signature on a tiny random 3D conv net: (B, 3, T, H, W) in [-1, 1] -> (B, 3)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 6, kernel_size=3, stride=(2, 8, 8))
        self.head = nn.Linear(6, 3)  # fewer dims than test videos: non-singular covariances

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True,
                return_features: bool = False) -> torch.Tensor:
        if rescale or resize or not return_features:
            raise ValueError("FVD must call the I3D with rescale=False, resize=False, return_features=True")
        features = torch.relu(self.conv(x)).mean(dim=(2, 3, 4))
        return 4.0 * self.head(features)


def save_tiny_i3d(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        scripted = torch.jit.script(TinyI3D())
    path = folder / I3D_WEIGHTS_FILE
    scripted.save(str(path))
    return path
