"""VQGAN / MaskGIT-VQGAN style convolutional encoder and decoder.

The family: GroupNorm + SiLU pre-activation residual blocks with bias-free 3x3 convs, no
attention, nearest x2 upsampling followed by a 3x3 conv in the decoder and 2x2 average pooling in
the encoder. With the defaults the decoder is the MaskGIT-VQGAN decoder that the released TiTok
S/B/L checkpoints ship as `pixel_decoder` (30.5M parameters), and its submodule names are those of
that checkpoint: conv_in, mid.{j}, up.{i}.block.{j}, up.{i}.upsample_conv, norm_out, conv_out.
With the defaults the encoder is the MaskGIT-VQGAN encoder, under that model's names: conv_in,
down.{i}.block.{j}, mid.{j}, norm_out, conv_out.

`VQGANEncoder` / `VQGANDecoder` are the taming / LlamaGen layout instead (biased convs, attention
at the coarsest level and in `mid`, strided-conv downsampling), under the names of the released
TokenFlow pixel branch: conv_in, conv_blocks.{i}.res.{j}, conv_blocks.{i}.attn.{j},
conv_blocks.{i}.downsample.conv / upsample.conv, mid.{0,1,2}, norm_out, conv_out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_vis.nn.attention import attend


class ResBlock(nn.Module):
    """h = conv2(silu(norm2(conv1(silu(norm1(x)))))), plus a residual.

    Equal channels: h + x. Different channels: h + nin_shortcut(x), a bias-free 1x1 conv, unless
    `maskgit_shortcut`: then h + nin_shortcut(h) with an (out, out) 1x1 conv and x dropped, the
    behaviour of the pixel decoder inside the released TiTok checkpoints, whose weights were
    trained that way.

    bias: give the three convs a bias (taming / LlamaGen VQGAN); MaskGIT-VQGAN has none.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm_groups: int = 32,
        norm_eps: float = 1e-6,
        maskgit_shortcut: bool = False,
        bias: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, in_channels, eps=norm_eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
        self.norm2 = nn.GroupNorm(norm_groups, out_channels, eps=norm_eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        self.maskgit_shortcut = maskgit_shortcut
        self.nin_shortcut = None
        if in_channels != out_channels:
            shortcut_in = out_channels if maskgit_shortcut else in_channels
            self.nin_shortcut = nn.Conv2d(shortcut_in, out_channels, 1, bias=bias)

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


class AttnBlock(nn.Module):
    """x + proj_out(attention(q, k, v)) over the h*w positions: one head of all C channels, scaled
    by C^-0.5, with q, k, v from biased 1x1 convs of norm(x) (taming / LlamaGen VQGAN)."""

    def __init__(self, channels: int, norm_groups: int = 32, norm_eps: float = 1e-6):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels, eps=norm_eps)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_norm = self.norm(x)
        # (B, 1, h*w, C): a single head; SDPA's default scale is C^-0.5, as in the official block.
        q, k, v = (proj(x_norm).reshape(b, 1, c, h * w).transpose(-1, -2) for proj in (self.q, self.k, self.v))
        out = attend(q, k, v)
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Zero pad right and bottom by one, then a 3x3 stride-2 conv (halves even sizes exactly)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VQGANLevel(nn.Module):
    """One resolution of the taming layout: `res.{j}` blocks, each followed by `attn.{j}` when
    `attention`, then `downsample` or `upsample` when `resample` names one."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_blocks: int,
        attention: bool,
        resample: str | None,
        norm_groups: int,
        norm_eps: float,
    ):
        super().__init__()
        norm = dict(norm_groups=norm_groups, norm_eps=norm_eps)
        channels = [in_channels] + [out_channels] * num_blocks
        self.res = nn.ModuleList(ResBlock(channels[j], channels[j + 1], bias=True, **norm) for j in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_channels, **norm) for _ in range(num_blocks if attention else 0))
        self.resample = resample
        if resample is not None:
            self.add_module(resample, {"downsample": Downsample, "upsample": Upsample}[resample](out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[j](x)
        return x if self.resample is None else getattr(self, self.resample)(x)


def _vqgan_mid(channels: int, norm_groups: int, norm_eps: float) -> nn.Sequential:
    norm = dict(norm_groups=norm_groups, norm_eps=norm_eps)
    return nn.Sequential(
        ResBlock(channels, channels, bias=True, **norm), AttnBlock(channels, **norm),
        ResBlock(channels, channels, bias=True, **norm),
    )


class VQGANEncoder(nn.Module):
    """(B, in_channels, H, W) -> (B, z_channels, H / 2**(L-1), W / 2**(L-1)), L = len(ch_mult).

    Level i has ch * ch_mult[i] channels (its first res-block maps from the previous level's width,
    ch for level 0); attention follows each res-block of the coarsest level only.
    """

    def __init__(
        self,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 256,
        norm_groups: int = 32,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList(
            VQGANLevel(
                ch if i == 0 else widths[i - 1], widths[i], num_res_blocks, attention=i == last,
                resample="downsample" if i < last else None, norm_groups=norm_groups, norm_eps=norm_eps,
            )
            for i in range(len(widths))
        )
        self.mid = _vqgan_mid(widths[-1], norm_groups, norm_eps)
        self.norm_out = nn.GroupNorm(norm_groups, widths[-1], eps=norm_eps)
        self.conv_out = nn.Conv2d(widths[-1], z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.conv_blocks:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VQGANDecoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_channels, h * 2**(L-1), w * 2**(L-1)); mirror of `VQGANEncoder`.

    `conv_blocks.0` is the coarsest level, at ch * ch_mult[-1]; level i has ch * ch_mult[L-1-i]
    channels and num_res_blocks + 1 res-blocks; only level 0 has attention after each res-block.
    """

    def __init__(
        self,
        z_channels: int = 256,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        out_channels: int = 3,
        norm_groups: int = 32,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        widths = [ch * m for m in reversed(ch_mult)]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(z_channels, widths[0], 3, padding=1)
        self.mid = _vqgan_mid(widths[0], norm_groups, norm_eps)
        self.conv_blocks = nn.ModuleList(
            VQGANLevel(
                widths[max(i - 1, 0)], widths[i], num_res_blocks + 1, attention=i == 0,
                resample="upsample" if i < last else None, norm_groups=norm_groups, norm_eps=norm_eps,
            )
            for i in range(len(widths))
        )
        self.norm_out = nn.GroupNorm(norm_groups, widths[-1], eps=norm_eps)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in self.conv_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))
