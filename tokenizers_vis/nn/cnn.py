"""VQGAN / MaskGIT-VQGAN style convolutional encoder and decoder.

The family: GroupNorm + SiLU pre-activation residual blocks with bias-free 3x3 convs, no
attention, nearest x2 upsampling followed by a 3x3 conv in the decoder and 2x2 average pooling in
the encoder. With the defaults the decoder is the MaskGIT-VQGAN decoder that the released TiTok
S/B/L checkpoints ship as `pixel_decoder` (30.5M parameters), and its submodule names are those of
that checkpoint: conv_in, mid.{j}, up.{i}.block.{j}, up.{i}.upsample_conv, norm_out, conv_out.
With the defaults the encoder is the MaskGIT-VQGAN encoder, under that model's names: conv_in,
down.{i}.block.{j}, mid.{j}, norm_out, conv_out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ResBlock(nn.Module):
    """h = conv2(silu(norm2(conv1(silu(norm1(x)))))), plus a residual.

    Equal channels: h + x. Different channels: h + nin_shortcut(x), a bias-free 1x1 conv, unless
    `maskgit_shortcut`: then h + nin_shortcut(h) with an (out, out) 1x1 conv and x dropped, the
    behaviour of the pixel decoder inside the released TiTok checkpoints, whose weights were
    trained that way.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm_groups: int = 32,
        norm_eps: float = 1e-6,
        maskgit_shortcut: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, in_channels, eps=norm_eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(norm_groups, out_channels, eps=norm_eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.maskgit_shortcut = maskgit_shortcut
        self.nin_shortcut = None
        if in_channels != out_channels:
            shortcut_in = out_channels if maskgit_shortcut else in_channels
            self.nin_shortcut = nn.Conv2d(shortcut_in, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.nin_shortcut is None:
            return h + x
        return h + self.nin_shortcut(h if self.maskgit_shortcut else x)


class DecoderLevel(nn.Module):
    """The residual blocks of one resolution, then (except at the finest level) x2 upsampling."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool, **block_kwargs):
        super().__init__()
        channels = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResBlock(channels[j], channels[j + 1], **block_kwargs) for j in range(num_blocks))
        self.upsample_conv = nn.Conv2d(out_channels, out_channels, 3, padding=1) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if self.upsample_conv is not None:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class ConvDecoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_channels, h * 2**(L-1), w * 2**(L-1)), L = len(channel_mult).

    Level i has base_channels * channel_mult[i] channels; levels run from the coarsest (the last,
    `up.{L-1}`) to `up.0`. `mid` holds num_res_blocks blocks at the coarsest width.
    """

    def __init__(
        self,
        z_channels: int = 256,
        out_channels: int = 3,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        norm_groups: int = 32,
        norm_eps: float = 1e-6,
        maskgit_shortcut: bool = True,
    ):
        super().__init__()
        widths = [base_channels * m for m in channel_mult]
        block_kwargs = dict(norm_groups=norm_groups, norm_eps=norm_eps, maskgit_shortcut=maskgit_shortcut)
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.mid = nn.ModuleList(ResBlock(widths[-1], widths[-1], **block_kwargs) for _ in range(num_res_blocks))
        # Level i reads the output of level i + 1 (the coarsest level reads `mid`).
        self.up = nn.ModuleList(
            DecoderLevel(widths[min(i + 1, len(widths) - 1)], widths[i], num_res_blocks, upsample=i > 0, **block_kwargs)
            for i in range(len(widths))
        )
        self.norm_out = nn.GroupNorm(norm_groups, widths[0], eps=norm_eps)
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        for block in self.mid:
            x = block(x)
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class EncoderLevel(nn.Module):
    """The residual blocks of one resolution, then (except at the coarsest level) 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: bool, **block_kwargs):
        super().__init__()
        channels = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResBlock(channels[j], channels[j + 1], **block_kwargs) for j in range(num_blocks))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return F.avg_pool2d(x, 2) if self.downsample else x


class ConvEncoder(nn.Module):
    """(B, in_channels, H, W) -> (B, z_channels, H / 2**(L-1), W / 2**(L-1)); mirror of `ConvDecoder`.

    bias-free 3x3 conv_in, levels `down.0` (finest) .. `down.{L-1}`, num_res_blocks `mid` blocks at
    the coarsest width, GroupNorm + SiLU, and a 1x1 conv_out to z_channels (MaskGIT-VQGAN layout).
    `maskgit_shortcut` defaults to True as in the decoder: the MaskGIT-VQGAN encoder uses the same
    residual block, so its pretrained weights expect that shortcut.
    """

    def __init__(
        self,
        in_channels: int = 3,
        z_channels: int = 256,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        norm_groups: int = 32,
        norm_eps: float = 1e-6,
        maskgit_shortcut: bool = True,
    ):
        super().__init__()
        widths = [base_channels * m for m in channel_mult]
        block_kwargs = dict(norm_groups=norm_groups, norm_eps=norm_eps, maskgit_shortcut=maskgit_shortcut)
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.down = nn.ModuleList(
            EncoderLevel(widths[max(i - 1, 0)], widths[i], num_res_blocks, downsample=i < len(widths) - 1,
                         **block_kwargs)
            for i in range(len(widths))
        )
        self.mid = nn.ModuleList(ResBlock(widths[-1], widths[-1], **block_kwargs) for _ in range(num_res_blocks))
        self.norm_out = nn.GroupNorm(norm_groups, widths[-1], eps=norm_eps)
        self.conv_out = nn.Conv2d(widths[-1], z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        for block in self.mid:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))
