"""Transformer blocks (pre- or post-norm, optional cross-attention), patch embedding and position
embeddings shared by every model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_vis.nn.attention import Attention


# Pointwise activations of the two-layer MLP by name (SwiGLU is handled apart: it gates).
ACTIVATIONS = {
    "gelu": F.gelu,  # exact erf form: ViT, CLIP, TiTok, BERT
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "quick_gelu": lambda h: h * torch.sigmoid(1.702 * h),  # OpenAI CLIP
    "relu": F.relu,
}


class MLP(nn.Module):
    """Two-layer MLP: fc1, activation, fc2. kind: an `ACTIVATIONS` name or "swiglu"."""

    def __init__(self, dim: int, hidden_dim: int, kind: str = "gelu", bias: bool = True):
        super().__init__()
        if kind not in (*ACTIVATIONS, "swiglu"):
            raise ValueError(f"unknown MLP kind {kind!r}; expected 'swiglu' or one of {sorted(ACTIVATIONS)}")
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
            h = ACTIVATIONS[self.kind](h)
        return self.fc2(h)


class TransformerBlock(nn.Module):
    """x + attn(norm1(x)); [x + cross_attn(norm_cross(x), context)]; x + mlp(norm2(x)).

    Options beyond the ViT defaults (FlexTok uses all of them):
      mlp_hidden_dim: hidden width of the MLP (default int(dim * mlp_ratio)).
      norm_affine: False gives block and QK-norm LayerNorms without weight and bias.
      attn_scale: softmax scale of the attention (None: 1/sqrt(head_dim)).
      modulation_dim: width of a conditioning vector that drives adaLN-zero (DiT): a Linear
        `modulation` maps silu(cond) to per-group gates, shifts and scales, and the block becomes
        x + gate_msa * attn(norm1(x) * (1 + scale_msa) + shift_msa), likewise for the MLP.
      modulation_groups: number of token groups with their own modulation (FlexTok: patches and
        registers); `forward` gets the group of each token.

    Options for query bottlenecks (Q-Former, Perceiver resampler); the defaults add nothing:
      norm_position: "pre" (above) or "post", BERT's order: x = norm1(x + attn(x));
        x = norm_cross(x + cross_attn(x, context)); x = norm2(x + mlp(x)). (BERT: norm_eps 1e-12,
        mlp_kind "gelu" (exact), bias True.)
      self_attention: False drops the self-attention sub-layer (`norm1`, `attn`): Perceiver layers,
        or an MLP-only sub-layer.
      cross_attention: adds `norm_cross` and `cross_attn`, between self-attention and the MLP; queries
        from the block's tokens, keys/values from `context` (width `context_dim`, default `dim`),
        projected as `cross_qkv_layout` ("separate" q/k/v or "q_kv") says.
      context_norm: a LayerNorm `norm_context` on the context before cross-attention (Perceiver).
      cross_attn_include_self: keys/values are concat(context, the queries' normed input) (Perceiver).
      head_dim: per-head width when heads * head_dim differs from dim.
      norm_bias: bias of the LayerNorms (None: same as `bias`); bias-free linears with biased norms
        is the Perceiver layout.
      dropout: dropout on each sub-layer's output; attn_dropout: on the attention probabilities.
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
        *,
        norm_position: str = "pre",
        self_attention: bool = True,
        cross_attention: bool = False,
        context_dim: int | None = None,
        cross_qkv_layout: str = "separate",
        context_norm: bool = False,
        cross_attn_include_self: bool = False,
        head_dim: int | None = None,
        norm_bias: bool | None = None,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
    ):
        super().__init__()
        if norm_position not in ("pre", "post"):
            raise ValueError(f"unknown norm_position {norm_position!r}; expected 'pre' or 'post'")
        if modulation_dim and (norm_position == "post" or not self_attention):
            raise ValueError("adaLN modulation needs a pre-norm block with self-attention")
        if cross_attn_include_self and (context_dim or dim) != dim:
            raise ValueError(f"cross_attn_include_self concatenates context and queries: context_dim "
                             f"{context_dim} must equal dim {dim}")
        self.dim = dim
        self.norm_position = norm_position
        self.dropout = dropout
        self.cross_attn_include_self = cross_attn_include_self
        norm_bias = bias if norm_bias is None else norm_bias
        norm_kwargs = {"eps": norm_eps, "bias": norm_bias} if norm_affine else {"eps": norm_eps,
                                                                                 "elementwise_affine": False}
        attn_kwargs = dict(qkv_bias=bias, proj_bias=bias, qk_norm=qk_norm, norm_eps=norm_eps, scale=attn_scale,
                           qk_norm_affine=norm_affine, head_dim=head_dim, dropout=attn_dropout)
        if self_attention:
            self.norm1 = nn.LayerNorm(dim, **norm_kwargs)
            self.attn = Attention(dim, num_heads, **attn_kwargs)
        if cross_attention:
            if context_norm:
                self.norm_context = nn.LayerNorm(context_dim or dim, **norm_kwargs)
            self.norm_cross = nn.LayerNorm(dim, **norm_kwargs)
            self.cross_attn = Attention(dim, num_heads, context_dim=context_dim, qkv_layout=cross_qkv_layout,
                                        **attn_kwargs)
        self.norm2 = nn.LayerNorm(dim, **norm_kwargs)
        self.mlp = MLP(dim, mlp_hidden_dim or int(dim * mlp_ratio), kind=mlp_kind, bias=bias)
        self.modulation_groups = modulation_groups
        if modulation_dim:
            self.modulation = nn.Linear(modulation_dim, modulation_groups * 6 * dim)

    @property
    def has_self_attention(self) -> bool:
        return hasattr(self, "attn")

    @property
    def has_cross_attention(self) -> bool:
        return hasattr(self, "cross_attn")

    def _sublayer(self, x: torch.Tensor, norm: nn.Module, fn) -> torch.Tensor:
        """Pre-norm x + fn(norm(x)) or post-norm norm(x + fn(x))."""
        post = self.norm_position == "post"
        h = fn(x if post else norm(x))
        if self.dropout:
            h = F.dropout(h, self.dropout, self.training)
        return norm(x + h) if post else x + h

    def self_attention_step(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._sublayer(x, self.norm1, lambda h: self.attn(h, mask))

    def cross_attention_step(self, x: torch.Tensor, context: torch.Tensor,
                             context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The cross-attention sub-layer; context_mask: (B, Lk) key-padding mask over the context."""
        if hasattr(self, "norm_context"):
            context = self.norm_context(context)

        def cross(h: torch.Tensor) -> torch.Tensor:
            ctx, ctx_mask = context, context_mask
            if self.cross_attn_include_self:
                ctx = torch.cat([context, h], dim=1)
                if ctx_mask is not None:  # the queries are always visible keys
                    keep = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
                    keep = keep if ctx_mask.dtype == torch.bool else torch.zeros_like(keep, dtype=ctx_mask.dtype)
                    ctx_mask = torch.cat([ctx_mask, keep], dim=1)
            return self.cross_attn(h, context=ctx, key_padding_mask=ctx_mask)

        return self._sublayer(x, self.norm_cross, cross)

    def mlp_step(self, x: torch.Tensor) -> torch.Tensor:
        return self._sublayer(x, self.norm2, self.mlp)

    def modulations(self, cond: torch.Tensor, groups: torch.Tensor | None) -> list[torch.Tensor]:
        """The six (B, N or 1, dim) modulation tensors, in `MODULATION_CHUNKS` order."""
        b, dim = cond.shape[0], self.dim
        mod = self.modulation(F.silu(cond)).view(b, self.modulation_groups, 6, dim)
        mod = mod[:, groups] if groups is not None else mod  # (B, N, 6, dim): each token its group's row
        return list(mod.unbind(2))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                groups: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """context: (B, Lk, context_dim) for the cross-attention sub-layer (required when the block has
        one, ignored otherwise, so a stack can pass it to every block); context_mask: (B, Lk) padding."""
        if self.has_cross_attention and context is None:
            raise ValueError("this block has a cross-attention sub-layer and needs a context")
        if cond is None:
            if self.has_self_attention:
                x = self.self_attention_step(x, mask)
            if self.has_cross_attention:
                x = self.cross_attention_step(x, context, context_mask)
            return self.mlp_step(x)
        gate_msa, gate_mlp, shift_msa, scale_msa, shift_mlp, scale_mlp = self.modulations(cond, groups)
        x = x + gate_msa * self.attn(self.norm1(x) * (1 + scale_msa) + shift_msa, mask)
        if self.has_cross_attention:  # unmodulated, as in PixArt's cross-attention
            x = self.cross_attention_step(x, context, context_mask)
        return x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)


class Transformer(nn.Module):
    """A stack of `TransformerBlock`s; block options pass through."""

    def __init__(self, dim: int, depth: int, num_heads: int, **block_kwargs):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(dim, num_heads, **block_kwargs) for _ in range(depth))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                groups: torch.Tensor | None = None, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_with_layer(x, mask, cond, groups, context=context, context_mask=context_mask)[0]

    def forward_with_layer(self, x: torch.Tensor, mask: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                           groups: torch.Tensor | None = None, layer: int | None = None,
                           context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None):
        """(output, hidden states after block `layer`, or None): REPA reads an intermediate layer."""
        hidden = None
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, mask, cond, groups, context, context_mask,
                                                      use_reentrant=False)
            else:
                x = block(x, mask, cond, groups, context, context_mask)
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
