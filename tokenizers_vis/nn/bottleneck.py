"""Query bottlenecks: a fixed number of learned queries read a variable-length feature sequence.

All are configurations of the shared `TransformerBlock` and the one `Attention`:
- `LearnedQueries`: the N x D learned query (latent) tokens.
- `QFormer`: BLIP-2's querying transformer. Queries and optional text tokens share self-attention;
  every `cross_attention_every` layers the queries (only) cross-attend to the features; queries and
  text have their own MLPs. Post-norm (BERT) or pre-norm; optional causal mask among the queries.
- `PerceiverResampler`: Flamingo's resampler. Per layer the latents cross-attend to
  concat(inputs, latents), then an MLP; optional input/output projections and final norm.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenizers_vis.nn.attention import query_text_mask
from tokenizers_vis.nn.transformer import TransformerBlock


class LearnedQueries(nn.Module):
    """`weight`: (num_queries, dim) learned tokens drawn from N(0, init_std^2); init_std None is
    dim^-0.5 (the house default for learned tokens; BLIP-2 uses 0.02)."""

    def __init__(self, num_queries: int, dim: int, init_std: float | None = None):
        super().__init__()
        std = dim ** -0.5 if init_std is None else init_std
        self.weight = nn.Parameter(torch.randn(num_queries, dim) * std)

    @property
    def num_queries(self) -> int:
        return self.weight.shape[0]

    def forward(self, batch_size: int) -> torch.Tensor:
        """(batch_size, num_queries, dim), a broadcast view of the same parameter."""
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)


class QFormer(nn.Module):
    """Learned queries that read `features` (B, Lf, context_dim) through a stack of shared blocks.

    Layer i has a cross-attention sub-layer when i % cross_attention_every == 0 (BLIP-2: 2, so
    layers 0, 2, ...). Only the queries go through it: text tokens see the image only through the
    queries, in self-attention. Submodules: `queries`, `input_norm` (the BERT embedding LayerNorm
    over queries and text; default on for post-norm), `blocks.{i}`, `text_blocks.{i}` (MLP-only
    blocks for the text tokens when `separate_text_mlp`), `final_norm` (default on for pre-norm).

    causal_queries: query i attends to queries 0..i only (SEED), so query i's output never depends
      on later queries. queries_see_text / causal_text: the text side of the self-attention mask
      (see `query_text_mask`). block_kwargs: passed to every block (mlp_ratio, mlp_kind, bias,
      norm_eps, head_dim, cross_qkv_layout, dropout, ...). BERT: norm_position "post",
      norm_eps 1e-12, mlp_kind "gelu", bias True (the defaults here besides norm_eps).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        num_queries: int,
        context_dim: int | None = None,
        cross_attention_every: int = 2,
        causal_queries: bool = False,
        queries_see_text: bool = True,
        causal_text: bool = False,
        norm_position: str = "post",
        norm_eps: float = 1e-12,
        input_norm: bool | None = None,
        final_norm: bool | None = None,
        separate_text_mlp: bool = True,
        query_init_std: float | None = 0.02,
        **block_kwargs,
    ):
        super().__init__()
        if cross_attention_every < 1:
            raise ValueError(f"cross_attention_every must be >= 1, got {cross_attention_every}")
        self.causal_queries = causal_queries
        self.queries_see_text = queries_see_text
        self.causal_text = causal_text
        self.queries = LearnedQueries(num_queries, dim, query_init_std)
        post = norm_position == "post"
        use_input = post if input_norm is None else input_norm
        self.input_norm = nn.LayerNorm(dim, eps=norm_eps) if use_input else nn.Identity()
        block = dict(norm_position=norm_position, norm_eps=norm_eps, **block_kwargs)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, cross_attention=i % cross_attention_every == 0, context_dim=context_dim,
                             **block)
            for i in range(depth))
        if separate_text_mlp:
            self.text_blocks = nn.ModuleList(TransformerBlock(dim, num_heads, self_attention=False, **block)
                                             for _ in range(depth))
        use_final = (not post) if final_norm is None else final_norm
        self.final_norm = nn.LayerNorm(dim, eps=norm_eps) if use_final else nn.Identity()

    @property
    def num_queries(self) -> int:
        return self.queries.num_queries

    def forward(self, features: torch.Tensor | None = None, text: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, features_mask: torch.Tensor | None = None,
                queries: torch.Tensor | None = None) -> torch.Tensor:
        """(B, Nq + Nt, dim): the query outputs, then the text outputs.

        features: (B, Lf, context_dim); None runs the text alone (no queries, no cross-attention:
          BLIP-2's unimodal text encoder). text: (B, Nt, dim) embedded text tokens (before the
          input norm). text_mask: (B, Nt), True/1 for real tokens. features_mask: (B, Lf) padding.
        queries: (B, Nq, dim) to use instead of the learned ones (e.g. perturbed probes).
        """
        if features is None and text is None:
            raise ValueError("a Q-Former needs features, text, or both")
        parts = []
        if features is not None:
            parts.append(self.queries(features.shape[0]) if queries is None else queries)
        if text is not None:
            parts.append(text)
        x = self.input_norm(torch.cat(parts, dim=1))
        num_queries = parts[0].shape[1] if features is not None else 0
        num_text = x.shape[1] - num_queries
        mask = query_text_mask(num_queries, num_text, causal_queries=self.causal_queries,
                               queries_see_text=self.queries_see_text, causal_text=self.causal_text,
                               text_padding=text_mask, device=x.device)
        for i, block in enumerate(self.blocks):
            x = block.self_attention_step(x, mask)
            q, t = x[:, :num_queries], x[:, num_queries:]
            if num_queries:
                if block.has_cross_attention:
                    q = block.cross_attention_step(q, features, features_mask)
                q = block.mlp_step(q)
            if num_text:
                t = (self.text_blocks[i] if hasattr(self, "text_blocks") else block).mlp_step(t)
            x = torch.cat([q, t], dim=1)
        return self.final_norm(x)


class PerceiverResampler(nn.Module):
    """Learned latents read `x` (B, L, input_dim): per layer latents += cross_attn(norm_context(x),
    norm_cross(latents)) with keys/values concat(x, latents), then latents += mlp(norm2(latents)).

    Submodules: `latents`, `proj_in` (Linear input_dim -> dim; when input_proj, or always when the
    widths differ), `layers.{i}` (blocks with `norm_context`, `norm_cross`, `cross_attn.{q, kv, proj}`,
    `norm2`, `mlp`), `proj_out` (Linear dim -> output_dim, when output_dim is set) and `norm_out`
    (LayerNorm over the output width, when final_norm). Flamingo: input_proj False, no output_dim,
    final_norm True. Linears are bias-free (bias), LayerNorms biased, as in Flamingo and IP-Adapter.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        num_latents: int,
        input_dim: int | None = None,
        output_dim: int | None = None,
        head_dim: int | None = None,
        mlp_ratio: float = 4.0,
        input_proj: bool = False,
        final_norm: bool = True,
        norm_eps: float = 1e-5,
        bias: bool = False,
        proj_bias: bool = True,
        latent_init_std: float | None = None,
        **block_kwargs,
    ):
        super().__init__()
        self.latents = LearnedQueries(num_latents, dim, latent_init_std)
        input_dim = input_dim or dim
        self.proj_in = nn.Linear(input_dim, dim, bias=proj_bias) if input_proj or input_dim != dim else nn.Identity()
        self.layers = nn.ModuleList(
            TransformerBlock(dim, num_heads, mlp_ratio=mlp_ratio, bias=bias, norm_bias=True, norm_eps=norm_eps,
                             head_dim=head_dim, self_attention=False, cross_attention=True, cross_qkv_layout="q_kv",
                             context_norm=True, cross_attn_include_self=True, **block_kwargs)
            for _ in range(depth))
        self.proj_out = nn.Linear(dim, output_dim, bias=proj_bias) if output_dim else nn.Identity()
        self.norm_out = nn.LayerNorm(output_dim or dim, eps=norm_eps) if final_norm else nn.Identity()

    @property
    def num_latents(self) -> int:
        return self.latents.num_queries

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, input_dim); mask: (B, L) padding over x (boolean, True keeps; or additive float).
        Returns (B, num_latents, output_dim or dim)."""
        x = self.proj_in(x)
        latents = self.latents(x.shape[0])
        for layer in self.layers:
            latents = layer(latents, context=x, context_mask=mask)
        return self.norm_out(self.proj_out(latents))
