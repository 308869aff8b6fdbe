"""A video UNet in the layout of DynamiCrafter's `lvdm` 3D UNet (Divot's de-tokenizer).

The network denoises latents (B, C, T, h, w). Spatial layers run per frame on (B*T, C, h, w);
temporal layers run per pixel over the T frames. Parameter names are those of the released
`diffusion_model.*` checkpoints, so those load as they are (the typo `temopral_conv` included):

  time_embed.{0,2}, fps_embedding.{0,2}    sinusoidal (cos first) timestep / frame-stride MLPs
  input_blocks.0.0                          input conv
  init_attn.0                               a temporal transformer right after the input conv
  input_blocks.i.j / middle_block.j /       `ResBlock` (GroupNorm-SiLU-conv twice, timestep added in
  output_blocks.i.j                           between, optional 1x1 skip, then `temopral_conv`: four
                                              GroupNorm-SiLU-conv(3x1x1) layers over time with a residual),
                                              `SpatialTransformer`, `TemporalTransformer`,
                                              `Downsample` (`op`, stride 2) or `Upsample` (`conv`)
  out.{0,2}                                 GroupNorm-SiLU-conv to the output channels

Transformer blocks: norm1 -> self-attention (`attn1`), norm2 -> `attn2` (spatial: cross-attention to
the context; temporal: self-attention again), norm3 -> GEGLU feed-forward (`ff.net.0.proj`, `ff.net.2`).
The spatial cross-attention with `image_cross_attention` splits the context: tokens before
`text_context_len` (77) go through `to_k`/`to_v`, the rest through `to_k_ip`/`to_v_ip`, and the two
outputs add as out + scale * out_ip * (tanh(alpha) + 1) (the `alpha` gate when learnable).
All attention goes through the framework's one `attend`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_vis.nn.attention import attend


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), cosines first (the lvdm order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (the lvdm `normalization`), returned in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    return GroupNorm32(32, channels, eps=eps)


class CrossAttention(nn.Module):
    """Bias-free q/k/v, `to_out.0` with bias; optional image branch (`to_k_ip`, `to_v_ip`, `alpha`)."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0, image_cross_attention: bool = False, image_scale: float = 1.0,
                 image_scale_learnable: bool = False, text_context_len: int = 77):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        self.image_cross_attention = image_cross_attention
        self.image_scale = image_scale
        self.image_scale_learnable = image_scale_learnable
        self.text_context_len = text_context_len
        if image_cross_attention:
            self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
            self.to_v_ip = nn.Linear(context_dim, inner, bias=False)
            if image_scale_learnable:
                self.alpha = nn.Parameter(torch.tensor(0.0))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def _attend(self, q, k, v) -> torch.Tensor:
        return attend(q, self._heads(k), self._heads(v))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        q = self._heads(self.to_q(x))
        if context is None:
            out = self._attend(q, self.to_k(x), self.to_v(x))
        elif self.image_cross_attention:
            text, image = context[:, :self.text_context_len], context[:, self.text_context_len:]
            out = self._attend(q, self.to_k(text), self.to_v(text))
            out_ip = self._attend(q, self.to_k_ip(image), self.to_v_ip(image))
            gate = torch.tanh(self.alpha) + 1 if self.image_scale_learnable else 1.0
            out = out + self.image_scale * out_ip * gate
        else:
            context = context[:, :self.text_context_len]
            out = self._attend(q, self.to_k(context), self.to_v(context))
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x))."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None, dropout: float = 0.0,
                 **image_kwargs):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout, **image_kwargs)
        self.ff = FeedForward(dim, dropout=dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Per-frame transformer over the h*w positions with cross-attention to the context; residual."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int = 1, context_dim: int | None = None,
                 dropout: float = 0.0, use_linear: bool = True, **image_kwargs):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout, **image_kwargs) for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        h_ = self.norm(x)
        if not self.use_linear:
            h_ = self.proj_in(h_)
        h_ = h_.flatten(2).transpose(1, 2)
        if self.use_linear:
            h_ = self.proj_in(h_)
        for block in self.transformer_blocks:
            h_ = block(h_, context)
        if self.use_linear:
            h_ = self.proj_out(h_)
        h_ = h_.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            h_ = self.proj_out(h_)
        return x + h_


class TemporalTransformer(nn.Module):
    """Self-attention over the T frames at every pixel of (B, C, T, h, w); the GroupNorm spans all
    frames (it sees the 5-D tensor); attn2 is a second self-attention (`temporal_selfatt_only`)."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int = 1, dropout: float = 0.0,
                 use_linear: bool = True):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv1d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, None, dropout) for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv1d(inner, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(x).permute(0, 3, 4, 1, 2).reshape(b * h * w, c, t)  # (b h w) c t
        if not self.use_linear:
            y = self.proj_in(y)
        y = y.transpose(1, 2)  # (b h w) t c
        if self.use_linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y)
        if self.use_linear:
            y = self.proj_out(y)
        else:
            y = self.proj_out(y.transpose(1, 2)).transpose(1, 2)
        y = y.reshape(b, h, w, t, c).permute(0, 4, 3, 1, 2)
        return x + y


class TemporalConvBlock(nn.Module):
    """Four GroupNorm-SiLU-Conv3d(3x1x1) layers over time on (B, C, T, h, w), plus the input."""

    def __init__(self, channels: int, dropout: float = 0.1):
        super().__init__()

        def conv(first: bool) -> nn.Sequential:
            layers = [nn.GroupNorm(32, channels), nn.SiLU()]
            if not first:
                layers.append(nn.Dropout(dropout))
            layers.append(nn.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0)))
            return nn.Sequential(*layers)

        self.conv1, self.conv2, self.conv3, self.conv4 = conv(True), conv(False), conv(False), conv(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv4(self.conv3(self.conv2(self.conv1(x))))


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 temporal_conv: bool = True):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(_norm(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        if temporal_conv:
            self.temopral_conv = TemporalConvBlock(out_channels, dropout=0.1)  # the released (misspelt) name

    def forward(self, x: torch.Tensor, emb: torch.Tensor, batch_size: int) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        h = self.skip_connection(x) + self.out_layers(h)
        if hasattr(self, "temopral_conv"):
            bt, c, hh, ww = h.shape
            h5 = h.view(batch_size, bt // batch_size, c, hh, ww).transpose(1, 2)
            h = self.temopral_conv(h5).transpose(1, 2).reshape(bt, c, hh, ww)
        return h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepSequential(nn.ModuleList):
    """Runs its layers on (B*T, C, h, w), giving each what it takes (timestep, context, frames)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None, batch_size: int,
                checkpoint: bool = False) -> torch.Tensor:
        for layer in self:
            if checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(_run_layer, layer, x, emb, context, batch_size,
                                                      use_reentrant=False)
            else:
                x = _run_layer(layer, x, emb, context, batch_size)
        return x


def _run_layer(layer: nn.Module, x, emb, context, batch_size: int):
    if isinstance(layer, ResBlock):
        return layer(x, emb, batch_size)
    if isinstance(layer, SpatialTransformer):
        return layer(x, context)
    if isinstance(layer, TemporalTransformer):
        bt, c, h, w = x.shape
        x5 = x.view(batch_size, bt // batch_size, c, h, w).transpose(1, 2)
        return layer(x5).transpose(1, 2).reshape(bt, c, h, w)
    return layer(x)


class VideoUNet(nn.Module):
    """DynamiCrafter's 3D UNet. `forward(x (B, C, T, h, w), timesteps (B,), context (B, L, context_dim),
    fs (B,) or None) -> (B, out_channels, T, h, w)`.

    The context is shared by all frames (repeated per frame). Sizes are the release's config names:
    DynamiCrafter-256 is model_channels 320, channel_mult (1, 2, 4, 4), num_res_blocks 2,
    attention_resolutions (4, 2, 1), num_head_channels 64, context_dim 1024. `init_attn_heads` is the
    head count of `init_attn` (8 in the release, whatever the width).
    gradient_checkpointing: recompute every layer in the backward pass (training memory).
    """

    def __init__(self, in_channels: int = 4, out_channels: int = 4, model_channels: int = 320,
                 channel_mult: Sequence[int] = (1, 2, 4, 4), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (4, 2, 1), num_head_channels: int = 64,
                 transformer_depth: int = 1, context_dim: int = 1024, dropout: float = 0.1, use_linear: bool = True,
                 temporal_conv: bool = True, temporal_attention: bool = True, addition_attention: bool = True,
                 image_cross_attention: bool = True, image_cross_attention_scale_learnable: bool = True,
                 text_context_len: int = 77, fs_condition: bool = True, default_fs: int = 3,
                 init_attn_heads: int = 8, gradient_checkpointing: bool = False):
        super().__init__()
        self.model_channels = model_channels
        self.default_fs = default_fs
        self.gradient_checkpointing = gradient_checkpointing
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if fs_condition:
            self.fps_embedding = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(),
                                               nn.Linear(emb_dim, emb_dim))
        image_kwargs = dict(image_cross_attention=image_cross_attention,
                            image_scale_learnable=image_cross_attention_scale_learnable,
                            text_context_len=text_context_len)

        def attention(ch: int) -> list[nn.Module]:
            heads = ch // num_head_channels
            layers: list[nn.Module] = [SpatialTransformer(ch, heads, num_head_channels, transformer_depth, context_dim,
                                                          dropout, use_linear, **image_kwargs)]
            if temporal_attention:
                layers.append(TemporalTransformer(ch, heads, num_head_channels, transformer_depth, dropout, use_linear))
            return layers

        def res(ch: int, out: int) -> ResBlock:
            return ResBlock(ch, emb_dim, dropout, out, temporal_conv)

        self.input_blocks = nn.ModuleList([TimestepSequential([nn.Conv2d(in_channels, model_channels, 3, padding=1)])])
        if addition_attention:
            # The release builds this one with a Conv1d projection (use_linear False).
            self.init_attn = TimestepSequential([TemporalTransformer(model_channels, init_attn_heads, num_head_channels,
                                                                     transformer_depth, dropout, use_linear=False)])
        chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers += attention(ch)
                self.input_blocks.append(TimestepSequential(layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepSequential([Downsample(ch)]))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepSequential([res(ch, ch), *attention(ch), res(ch, ch)])
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers += attention(ch)
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepSequential(layers))
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                fs: torch.Tensor | None = None) -> torch.Tensor:
        b, _, t, h, w = x.shape
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(b)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).type(x.dtype))
        if hasattr(self, "fps_embedding"):
            if fs is None:
                fs = torch.full((b,), self.default_fs, dtype=torch.long, device=x.device)
            emb = emb + self.fps_embedding(timestep_embedding(fs, self.model_channels).type(x.dtype))
        emb = emb.repeat_interleave(t, dim=0)
        context = context.repeat_interleave(t, dim=0)
        h_ = x.transpose(1, 2).reshape(b * t, -1, h, w)
        ckpt = self.gradient_checkpointing
        skips = []
        for i, block in enumerate(self.input_blocks):
            h_ = block(h_, emb, context, b, ckpt)
            if i == 0 and hasattr(self, "init_attn"):
                h_ = self.init_attn(h_, emb, context, b, ckpt)
            skips.append(h_)
        h_ = self.middle_block(h_, emb, context, b, ckpt)
        for block in self.output_blocks:
            h_ = block(torch.cat([h_, skips.pop()], dim=1), emb, context, b, ckpt)
        y = self.out(h_)
        return y.view(b, t, *y.shape[1:]).transpose(1, 2)
