"""Synthetic inputs for the metric tests: natural-looking images and a tiny feature network."""

from __future__ import annotations

import math

import torch
from torch import nn


def natural_images(n: int, height: int = 48, width: int = 48, seed: int = 0, noise: float = 0.05) -> torch.Tensor:
    """(n, 3, H, W) float images in [0, 1]: smooth random waves per image plus pixel noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    freq = 2 + 6 * torch.rand(n, 3, 2, generator=g)
    phase = 2 * math.pi * torch.rand(n, 3, 2, generator=g)
    waves = torch.sin(freq[..., 0, None, None] * xx + phase[..., 0, None, None]) * torch.cos(
        freq[..., 1, None, None] * yy + phase[..., 1, None, None]
    )
    images = 0.5 + 0.35 * waves + noise * torch.randn(n, 3, height, width, generator=g)
    return images.clamp(0, 1)


def degrade(images: torch.Tensor, seed: int = 1, noise: float = 0.08) -> torch.Tensor:
    """A plausible "reconstruction": a blurred, noisier copy."""
    g = torch.Generator().manual_seed(seed)
    blurred = nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    return (blurred + noise * torch.randn(images.shape, generator=g)).clamp(0, 1)


class TinyFeatureNet(nn.Module):
    """Stand-in for Inception: (B, 3, H, W) uint8 -> (B, dim) features, random but seeded."""

    def __init__(self, dim: int = 16, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            # A coarse spatial grid keeps features spread out (a global average would make
            # every image look alike and every FID nearly zero).
            self.body = nn.Sequential(
                nn.Conv2d(3, 8, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(4),
                nn.Flatten(),
                nn.Linear(8 * 16, dim),
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8, "FID feature extractors receive uint8 images"
        return 10.0 * self.body(images.float() / 127.5 - 1.0)
