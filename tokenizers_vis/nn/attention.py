"""The one attention of the framework (on `F.scaled_dot_product_attention`) and its masks.

Everything that attends goes through `attend`: self- and cross-attention (`Attention`) and the
spatial attention of the conv nets. Masks are boolean where True means "may attend" (the convention
of SDPA) or additive floats (0 keeps, a large negative value or -inf drops, BERT's convention).
A full mask broadcasts to (B, heads, Lq, Lk): (Lq, Lk), (B or 1, heads or 1, Lq, Lk); a key-padding
mask is (B, Lk). `None` means full attention and lets SDPA pick its fastest kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Layouts of the input projections: one packed q|k|v Linear (self-attention only), q plus a packed
# k|v Linear, or three Linears. Cross-attention needs one of the last two.
QKV_LAYOUTS = ("packed", "q_kv", "separate")


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def merge_masks(mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """One SDPA mask from a full mask (broadcastable to (B, H, Lq, Lk)) and a (B, Lk) key-padding
    mask: boolean if both are boolean (their AND), otherwise additive in `dtype` (their sum)."""
    if key_padding_mask is None:
        return mask if mask is None or mask.dtype == torch.bool else mask.to(dtype)
    if key_padding_mask.dim() != 2:
        raise ValueError(f"a key-padding mask is (B, Lk), got shape {tuple(key_padding_mask.shape)}")
    padding = key_padding_mask[:, None, None, :]
    if mask is None:
        return padding if padding.dtype == torch.bool else padding.to(dtype)
    if mask.dtype == torch.bool and padding.dtype == torch.bool:
        return mask & padding
    return _additive(mask, dtype) + _additive(padding, dtype)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
           dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v on (B, H, L, D) tensors; the one call of SDPA.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D). mask: boolean or additive, broadcastable to
    (B, H, Lq, Lk). key_padding_mask: boolean or additive (B, Lk). scale: None is 1/sqrt(D).
    A query row whose keys are all masked out by a boolean/-inf mask has no defined output (NaN).
    """
    if key_padding_mask is not None and key_padding_mask.shape != (k.shape[0], k.shape[2]):
        raise ValueError(f"key-padding mask of shape {tuple(key_padding_mask.shape)} does not match "
                         f"{k.shape[0]} sequences of {k.shape[2]} keys")
    mask = merge_masks(mask, key_padding_mask, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


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


def query_text_mask(num_queries: int, num_text: int, causal_queries: bool = False, queries_see_text: bool = True,
                    causal_text: bool = False, text_padding: torch.Tensor | None = None,
                    device: torch.device | None = None) -> torch.Tensor | None:
    """Self-attention mask over [queries, text] (BLIP-2 Q-Former), (L, L) or (B, 1, L, L) with padding.

    Text tokens always see all queries and the text (all of it, or tokens 0..i with `causal_text`:
    BLIP-2's image-grounded generation); queries see queries (0..i with `causal_queries`) and, with
    `queries_see_text`, the text (BLIP-2's matching mode and SEED's layout). text_padding: (B, num_text),
    True (or 1) for real tokens; padded text is hidden from every query. None when nothing is masked.
    """
    n = num_queries + num_text
    mask = torch.ones(n, n, dtype=torch.bool, device=device)
    if causal_queries:
        mask[:num_queries, :num_queries] = causal_mask(num_queries, device)
    if not queries_see_text:
        mask[:num_queries, num_queries:] = False
    if causal_text:
        mask[num_queries:, num_queries:] = causal_mask(num_text, device)
    if text_padding is not None:
        if text_padding.shape[-1] != num_text:
            raise ValueError(f"text padding covers {text_padding.shape[-1]} tokens, not {num_text}")
        if text_padding.is_floating_point() and bool((text_padding < 0).any()):
            raise ValueError("text_padding marks real tokens with True/1; an additive (negative) mask inverts it")
        keys = torch.cat([torch.ones(text_padding.shape[0], num_queries, dtype=torch.bool, device=text_padding.device),
                          text_padding.bool()], dim=1)
        return mask.to(keys.device)[None, None] & keys[:, None, None, :]
    return None if bool(mask.all()) else mask


class Attention(nn.Module):
    """Multi-head attention, self or cross, with optional QK-norm.

    Self-attention with the default packed q, k, v projection (in that order) keeps the names
    `qkv`, `proj`, `q_norm`, `k_norm` that the official TiTok / FlexTok / TokenFlow weights load into.
    qkv_layout: "packed" (one `qkv` Linear; self-attention only), "q_kv" (`q` and a packed `kv`
        Linear, Perceiver/Flamingo style) or "separate" (`q`, `k`, `v`, BERT style).
    context_dim: width of the key/value sequence when it differs from `dim` (cross-attention).
    head_dim: per-head width when heads * head_dim differs from `dim` (Perceiver resamplers);
        `proj` maps heads * head_dim back to `dim`.
    qk_norm_affine: False gives QK-norm LayerNorms without weight and bias (FlexTok).
    scale: softmax scale; None is SDPA's 1/sqrt(head_dim) (FlexTok uses the muP 8/head_dim).
    dropout: dropout on the attention probabilities while training.
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
        context_dim: int | None = None,
        qkv_layout: str = "packed",
        head_dim: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        if qkv_layout not in QKV_LAYOUTS:
            raise ValueError(f"unknown qkv_layout {qkv_layout!r}; expected one of {QKV_LAYOUTS}")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"width {dim} is not divisible by the number of heads {num_heads}")
            head_dim = dim // num_heads
        if qkv_layout == "packed" and context_dim is not None:
            raise ValueError("a packed qkv projection reads one sequence; cross-attention (context_dim) needs "
                             "qkv_layout 'q_kv' or 'separate'")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale  # None: SDPA's default 1/sqrt(head_dim)
        self.qkv_layout = qkv_layout
        self.dropout = dropout
        inner, kv_dim = num_heads * head_dim, context_dim or dim
        if qkv_layout == "packed":
            self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        else:
            self.q = nn.Linear(dim, inner, bias=qkv_bias)
            if qkv_layout == "q_kv":
                self.kv = nn.Linear(kv_dim, 2 * inner, bias=qkv_bias)
            else:
                self.k = nn.Linear(kv_dim, inner, bias=qkv_bias)
                self.v = nn.Linear(kv_dim, inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim, bias=proj_bias)
        norm = lambda: nn.LayerNorm(self.head_dim, eps=norm_eps, elementwise_affine=qk_norm_affine)  # noqa: E731
        self.q_norm = norm() if qk_norm else nn.Identity()
        self.k_norm = norm() if qk_norm else nn.Identity()

    def _heads(self, t: torch.Tensor, parts: int) -> list[torch.Tensor]:
        """(B, L, parts * H * D) -> `parts` tensors of (B, H, L, D)."""
        b, n, _ = t.shape
        return list(t.view(b, n, parts, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, context: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, Lq, dim) queries; context: (B, Lk, context_dim) keys/values (None: x itself).
        mask: full mask broadcastable to (B, H, Lq, Lk); key_padding_mask: (B, Lk) over the keys."""
        b, n, _ = x.shape
        if self.qkv_layout == "packed":
            if context is not None:
                raise ValueError("this attention has a packed qkv projection and cannot read a context")
            q, k, v = self._heads(self.qkv(x), 3)
        else:
            context = x if context is None else context
            (q,) = self._heads(self.q(x), 1)
            if self.qkv_layout == "q_kv":
                k, v = self._heads(self.kv(context), 2)
            else:
                (k,), (v,) = self._heads(self.k(context), 1), self._heads(self.v(context), 1)
        q, k = self.q_norm(q), self.k_norm(k)
        out = attend(q, k, v, mask, scale=self.scale, key_padding_mask=key_padding_mask,
                     dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))
