"""The one attention layer of the framework (on `F.scaled_dot_product_attention`) and its masks.

Masks are boolean (N, N) tensors where True means "may attend", the convention of SDPA.
`None` means full attention and lets SDPA pick its fastest kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def causal_mask(num_tokens: int, device: torch.device | None = None) -> torch.Tensor:
    """Token i attends to tokens 0..i."""
    return torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=device).tril()


def prefix_causal_mask(num_prefix: int, num_causal: int, device: torch.device | None = None) -> torch.Tensor:
    """Prefix tokens (e.g. patches) attend only to the prefix; causal token i (e.g. register i)
    attends to the whole prefix and to causal tokens 0..i."""
    n = num_prefix + num_causal
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    mask[:, :num_prefix] = True
    mask[num_prefix:, num_prefix:] = causal_mask(num_causal, device)
    return mask


def build_mask(kind: str, num_tokens: int, num_prefix: int = 0, device=None) -> torch.Tensor | None:
    """Mask by name: "full" (None), "causal", or "prefix_causal" (with `num_prefix` prefix tokens)."""
    if kind == "full":
        return None
    if kind == "causal":
        return causal_mask(num_tokens, device)
    if kind == "prefix_causal":
        if not 0 <= num_prefix <= num_tokens:
            raise ValueError(f"num_prefix must lie in [0, {num_tokens}], got {num_prefix}")
        return prefix_causal_mask(num_prefix, num_tokens - num_prefix, device)
    raise ValueError(f"unknown attention mask {kind!r}; expected 'full', 'causal' or 'prefix_causal'")


class Attention(nn.Module):
    """Multi-head self-attention with packed q, k, v (in that order) and optional QK-norm.

    qk_norm_affine: False gives QK-norm LayerNorms without weight and bias (FlexTok).
    scale: softmax scale; None is SDPA's 1/sqrt(head_dim) (FlexTok uses the muP 8/head_dim).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        scale: float | None = None,
        qk_norm_affine: bool = True,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by the number of heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = scale  # None: SDPA's default 1/sqrt(head_dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        norm = lambda: nn.LayerNorm(self.head_dim, eps=norm_eps, elementwise_affine=qk_norm_affine)  # noqa: E731
        self.q_norm = norm() if qk_norm else nn.Identity()
        self.k_norm = norm() if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))
