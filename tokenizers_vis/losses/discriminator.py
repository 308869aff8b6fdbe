"""Image discriminators for the adversarial loss, and a registry to build them by name.

Both take images in [0, 1] (mapped to [-1, 1] inside) and return a (B, 1, h, w) map of logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Binomial [1, 3, 3, 1] taps: the smallest blur that suppresses aliasing before a stride-2 step.
BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)


def _check_groups(channels: int, num_groups: int) -> None:
    if num_groups < 1 or channels % num_groups:
        raise ValueError(f"GroupNorm needs num_groups ({num_groups}) to divide the channel count ({channels})")


class BlurDownsample(nn.Module):
    """Fixed separable [1, 3, 3, 1] blur applied per channel with stride 2 (halves H and W)."""

    def __init__(self, channels: int, taps: Sequence[float] = BLUR_TAPS):
        super().__init__()
        taps_1d = torch.tensor(taps, dtype=torch.float32)
        kernel = torch.outer(taps_1d, taps_1d)
        kernel = kernel / kernel.sum()
        self.channels = channels
        # Padding so that an even input size is exactly halved.
        self.padding = (len(taps) - 2) // 2
        # A constant, not a weight: kept out of the state dict.
        self.register_buffer("kernel", kernel.expand(channels, 1, *kernel.shape).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel.to(x.dtype), stride=2, padding=self.padding, groups=self.channels)


class TiTokDiscriminator(nn.Module):
    """TiTok's discriminator: 5x5 stem, conv3x3 + blur-downsample + GroupNorm + LeakyReLU stages,
    adaptive max-pool to a fixed grid, then 1x1 and 5x5 convs to one logit channel."""

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 128,
        channel_mults: Sequence[int] = (1, 2, 4),
        num_groups: int = 32,
        pool_size: int = 16,
        negative_slope: float = 0.1,
    ):
        super().__init__()
        widths = [base_channels * m for m in channel_mults]
        for width in widths:
            _check_groups(width, num_groups)
        self.stem = nn.Conv2d(in_channels, base_channels, kernel_size=5, padding=2)
        stages = []
        previous = base_channels
        for width in widths:
            stages.append(
                nn.Sequential(
                    nn.Conv2d(previous, width, kernel_size=3, padding=1),
                    BlurDownsample(width),
                    nn.GroupNorm(num_groups, width),
                    nn.LeakyReLU(negative_slope),
                )
            )
            previous = width
        self.stages = nn.Sequential(*stages)
        # A fixed output grid makes the logit map size independent of the input resolution.
        self.pool = nn.AdaptiveMaxPool2d(pool_size)
        self.to_logits = nn.Sequential(
            nn.Conv2d(previous, previous, kernel_size=1),
            nn.LeakyReLU(negative_slope),
            nn.Conv2d(previous, 1, kernel_size=5, padding=2),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images * 2 - 1)
        return self.to_logits(self.pool(self.stages(x)))


# DCGAN initialisation, the standard for this PatchGAN: N(0, 0.02) convs, N(1, 0.02) norm scales.
DCGAN_INIT_STD = 0.02


def _dcgan_init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, DCGAN_INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, DCGAN_INIT_STD)
        nn.init.zeros_(module.bias)


class PatchGANDiscriminator(nn.Module):
    """The pix2pix / VQGAN "N-layer" PatchGAN: 4x4 convs (stride 2, then 1), norm, LeakyReLU 0.2."""

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        num_layers: int = 3,
        norm: str = "batch",
        num_groups: int = 32,
        max_channel_mult: int = 8,
        negative_slope: float = 0.2,
    ):
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"PatchGAN norm must be 'batch' or 'group', got {norm!r}")
        if num_layers < 1:
            raise ValueError(f"PatchGAN needs num_layers >= 1, got {num_layers}")

        def normalization(channels: int) -> nn.Module:
            if norm == "group":
                _check_groups(channels, num_groups)
                return nn.GroupNorm(num_groups, channels)
            return nn.BatchNorm2d(channels)

        def width(level: int) -> int:
            return base_channels * min(2**level, max_channel_mult)

        # The first layer has no norm; biases before a norm layer are redundant.
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, base_channels, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(negative_slope),
        ]
        for level in range(1, num_layers + 1):
            stride = 2 if level < num_layers else 1  # the last hidden layer keeps the resolution
            layers += [
                nn.Conv2d(width(level - 1), width(level), kernel_size=4, stride=stride, padding=1, bias=False),
                normalization(width(level)),
                nn.LeakyReLU(negative_slope),
            ]
        layers.append(nn.Conv2d(width(num_layers), 1, kernel_size=4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images * 2 - 1)


DISCRIMINATORS: dict[str, type[nn.Module]] = {
    "titok": TiTokDiscriminator,
    "patchgan": PatchGANDiscriminator,
}


def build_discriminator(name: str, **kwargs) -> nn.Module:
    """Build a registered discriminator by name ("titok" or "patchgan") from its keyword arguments."""
    if name not in DISCRIMINATORS:
        raise ValueError(f"unknown discriminator {name!r}; known: {', '.join(sorted(DISCRIMINATORS))}")
    return DISCRIMINATORS[name](**kwargs)
