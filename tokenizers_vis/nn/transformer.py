"""Pre-norm transformer blocks, patch embedding and position embeddings shared by every model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_vis.nn.attention import Attention


class MLP(nn.Module):
    """Two-layer MLP: GELU (exact erf form, as ViT/CLIP/TiTok) or SwiGLU."""

    def __init__(self, dim: int, hidden_dim: int, kind: str = "gelu", bias: bool = True):
        super().__init__()
        if kind not in ("gelu", "swiglu"):
            raise ValueError(f"unknown MLP kind {kind!r}; expected 'gelu' or 'swiglu'")
        self.kind = kind
        # SwiGLU packs the gate and the value into one matmul.
        self.fc1 = nn.Linear(dim, hidden_dim * (2 if kind == "swiglu" else 1), bias=bias)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.kind == "swiglu":
            value, gate = h.chunk(2, dim=-1)
            h = value * F.silu(gate)
        else:
            h = F.gelu(h)
        return self.fc2(h)


class TransformerBlock(nn.Module):
    """x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        mlp_kind: str = "gelu",
        bias: bool = True,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, bias=bias)
        self.attn = Attention(dim, num_heads, qkv_bias=bias, proj_bias=bias, qk_norm=qk_norm, norm_eps=norm_eps)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, bias=bias)
        self.mlp = MLP(dim, int(dim * mlp_ratio), kind=mlp_kind, bias=bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of `TransformerBlock`s; block options pass through."""

    def __init__(self, dim: int, depth: int, num_heads: int, **block_kwargs):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(dim, num_heads, **block_kwargs) for _ in range(depth))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x


class PatchEmbed(nn.Module):
    """Non-overlapping conv patch embedding: (B, C, H, W) -> (B, H/p * W/p, dim), row-major."""

    def __init__(self, patch_size: int, in_channels: int, dim: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def sincos_2d_position_embedding(grid_size: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine embedding (MAE style), (grid_size**2, dim), row-major."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    parts = []
    for axis in (yy, xx):
        angles = axis.reshape(-1, 1) * omega.reshape(1, -1)
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def init_vit_weights(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal linear/conv weights, zero biases, unit norms (ViT/TiTok convention)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def embedding_parameter(*shape: int, width: int) -> nn.Parameter:
    """A learned token / position embedding initialised with std width**-0.5 (CLIP/TiTok)."""
    return nn.Parameter(torch.randn(*shape) * (1.0 / math.sqrt(width)))
