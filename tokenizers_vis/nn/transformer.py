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
    """x + attn(norm1(x)); x + mlp(norm2(x)).

    Options beyond the ViT defaults (FlexTok uses all of them):
      mlp_hidden_dim: hidden width of the MLP (default int(dim * mlp_ratio)).
      norm_affine: False gives block and QK-norm LayerNorms without weight and bias.
      attn_scale: softmax scale of the attention (None: 1/sqrt(head_dim)).
      modulation_dim: width of a conditioning vector that drives adaLN-zero (DiT): a Linear
        `modulation` maps silu(cond) to per-group gates, shifts and scales, and the block becomes
        x + gate_msa * attn(norm1(x) * (1 + scale_msa) + shift_msa), likewise for the MLP.
      modulation_groups: number of token groups with their own modulation (FlexTok: patches and
        registers); `forward` gets the group of each token.
    """

    # Order of the six modulation chunks; the official FlexTok order, so its weights load as they are.
    MODULATION_CHUNKS = ("gate_msa", "gate_mlp", "shift_msa", "scale_msa", "shift_mlp", "scale_mlp")

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        mlp_kind: str = "gelu",
        bias: bool = True,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
        mlp_hidden_dim: int | None = None,
        norm_affine: bool = True,
        attn_scale: float | None = None,
        modulation_dim: int | None = None,
        modulation_groups: int = 1,
    ):
        super().__init__()
        norm_kwargs = {"eps": norm_eps, "bias": bias} if norm_affine else {"eps": norm_eps, "elementwise_affine": False}
        self.norm1 = nn.LayerNorm(dim, **norm_kwargs)
        self.attn = Attention(dim, num_heads, qkv_bias=bias, proj_bias=bias, qk_norm=qk_norm, norm_eps=norm_eps,
                              scale=attn_scale, qk_norm_affine=norm_affine)
        self.norm2 = nn.LayerNorm(dim, **norm_kwargs)
        self.mlp = MLP(dim, mlp_hidden_dim or int(dim * mlp_ratio), kind=mlp_kind, bias=bias)
        self.modulation_groups = modulation_groups
        if modulation_dim:
            self.modulation = nn.Linear(modulation_dim, modulation_groups * 6 * dim)

    def modulations(self, cond: torch.Tensor, groups: torch.Tensor | None) -> list[torch.Tensor]:
        """The six (B, N or 1, dim) modulation tensors, in `MODULATION_CHUNKS` order."""
        b, dim = cond.shape[0], self.norm1.normalized_shape[0]
        mod = self.modulation(F.silu(cond)).view(b, self.modulation_groups, 6, dim)
        mod = mod[:, groups] if groups is not None else mod  # (B, N, 6, dim): each token its group's row
        return list(mod.unbind(2))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                groups: torch.Tensor | None = None) -> torch.Tensor:
        if cond is None:
            x = x + self.attn(self.norm1(x), mask)
            return x + self.mlp(self.norm2(x))
        gate_msa, gate_mlp, shift_msa, scale_msa, shift_mlp, scale_mlp = self.modulations(cond, groups)
        x = x + gate_msa * self.attn(self.norm1(x) * (1 + scale_msa) + shift_msa, mask)
        return x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)


class Transformer(nn.Module):
    """A stack of `TransformerBlock`s; block options pass through."""

    def __init__(self, dim: int, depth: int, num_heads: int, **block_kwargs):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(dim, num_heads, **block_kwargs) for _ in range(depth))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                groups: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_with_layer(x, mask, cond, groups)[0]

    def forward_with_layer(self, x: torch.Tensor, mask: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                           groups: torch.Tensor | None = None, layer: int | None = None):
        """(output, hidden states after block `layer`, or None): REPA reads an intermediate layer."""
        hidden = None
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, mask, cond, groups, use_reentrant=False)
            else:
                x = block(x, mask, cond, groups)
            if i == layer:
                hidden = x
        return x, hidden


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


def init_vit_weights(module: nn.Module, std: float = 0.02, linear_init: str = "trunc_normal") -> None:
    """Zero biases, unit norms, and linear/conv weights drawn as
    "trunc_normal": N(0, std) truncated (the ViT / official TiTok convention), or
    "xavier": Xavier-uniform linears (the MAE convention). At small scale its larger attention
        weights let the decoder start routing latent tokens to positions far sooner (measured on
        the demo: reconstructions stop being one mean image within ~200 steps instead of >250).
    """
    if linear_init not in ("trunc_normal", "xavier"):
        raise ValueError(f"unknown init {linear_init!r}; expected 'trunc_normal' or 'xavier'")
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if linear_init == "xavier" and isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
            else:
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


def interpolate_position_table(table: torch.Tensor, grid: int, official_offset: float = 0.1) -> torch.Tensor:
    """Resample a square (n*n, D) position table to (grid*grid, D), rows row-major.

    Identity when n == grid. Otherwise the BEiT / TokenFlow call, which checkpoints trained with it
    depend on: bicubic (align_corners False) with `scale_factor=(grid + offset) / n`, not
    `size=grid`. PyTorch then samples source coordinate (dst + 0.5) * n / (grid + offset) - 0.5, a
    slightly different grid than a resize to `grid` would use; the output side is
    floor(n * (grid + offset) / n) = grid.
    """
    rows, dim = table.shape
    n = math.isqrt(rows)
    if n * n != rows:
        raise ValueError(f"a position table needs a square number of rows, got {rows}")
    if n == grid:
        return table
    square = table.reshape(1, n, n, dim).permute(0, 3, 1, 2)
    factor = (grid + official_offset) / n
    out = F.interpolate(square.float(), scale_factor=(factor, factor), mode="bicubic", align_corners=False)
    if out.shape[-2:] != (grid, grid):  # floor(n * factor) rounding; guards unusual offsets
        raise ValueError(f"interpolating a {n}x{n} table with offset {official_offset} gave "
                         f"{tuple(out.shape[-2:])}, not {grid}x{grid}")
    return out.to(table.dtype).permute(0, 2, 3, 1).reshape(grid * grid, dim)
