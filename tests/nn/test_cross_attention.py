"""The shared attention (self and cross, every mask kind) and the block's cross-attention and
post-norm options, checked against hand computations with torch primitives."""

import math

import pytest
import torch
import torch.nn.functional as F

from tokenizers_vis.nn.attention import Attention, attend, merge_masks
from tokenizers_vis.nn.transformer import MLP, Transformer, TransformerBlock

B, H, LQ, LK, D = 2, 3, 4, 6, 5


def hand_attention(q, k, v, additive=None, scale=None):
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if additive is not None:
        scores = scores + additive
    return scores.softmax(-1) @ v


def as_additive(mask):
    return torch.zeros(mask.shape).masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else mask


def random_mask(*shape, generator):
    mask = torch.rand(*shape, generator=generator) > 0.4
    mask[..., 0] = True  # every query keeps a key
    return mask


@pytest.mark.parametrize("kind", ["none", "bool_2d", "bool_4d", "float_4d", "bool_padding", "float_padding",
                                  "bool_full_and_padding", "float_full_and_bool_padding"])
def test_attend_equals_hand_softmax(kind):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, LQ, D, generator=g)
    k, v = torch.randn(B, H, LK, D, generator=g), torch.randn(B, H, LK, D, generator=g)
    full = {"bool_2d": random_mask(LQ, LK, generator=g), "bool_4d": random_mask(B, 1, LQ, LK, generator=g),
            "float_4d": torch.randn(B, H, LQ, LK, generator=g) * 3,
            "bool_full_and_padding": random_mask(1, H, LQ, LK, generator=g),
            "float_full_and_bool_padding": -10000.0 * (~random_mask(B, 1, LQ, LK, generator=g)).float()}.get(kind)
    padding = {"bool_padding": random_mask(B, LK, generator=g),
               "float_padding": -10000.0 * (~random_mask(B, LK, generator=g)).float(),
               "bool_full_and_padding": random_mask(B, LK, generator=g),
               "float_full_and_bool_padding": random_mask(B, LK, generator=g)}.get(kind)
    additive = torch.zeros(B, H, LQ, LK)
    if full is not None:
        additive = additive + as_additive(full)
    if padding is not None:
        additive = additive + as_additive(padding)[:, None, None, :]
    out = attend(q, k, v, full, key_padding_mask=padding)
    torch.testing.assert_close(out, hand_attention(q, k, v, additive), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attend(q, k, v, full, scale=0.3, key_padding_mask=padding),
                               hand_attention(q, k, v, additive, scale=0.3), atol=1e-5, rtol=1e-5)


def test_masks_merge_boolean_when_both_are_boolean():
    full, padding = torch.ones(3, 4, dtype=torch.bool).tril(), torch.tensor([[True, True, False, True]])
    merged = merge_masks(full, padding)
    assert merged.dtype == torch.bool and merged.shape == (1, 1, 3, 4)
    assert torch.equal(merged[0, 0], full & padding)
    with pytest.raises(ValueError, match="key-padding"):
        attend(torch.randn(1, 1, 3, 2), torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2),
               key_padding_mask=padding[:, :3])


def heads(t, h):
    b, n, c = t.shape
    return t.view(b, n, h, c // h).transpose(1, 2)


@pytest.mark.parametrize("layout", ["q_kv", "separate"])
def test_cross_attention_equals_hand_computation(layout):
    torch.manual_seed(0)
    attn = Attention(12, num_heads=3, context_dim=7, qkv_layout=layout).eval()
    x, ctx = torch.randn(2, 4, 12), torch.randn(2, 6, 7)
    padding = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    if layout == "q_kv":
        k_lin, v_lin = F.linear(ctx, attn.kv.weight, attn.kv.bias).chunk(2, -1)
    else:
        k_lin, v_lin = attn.k(ctx), attn.v(ctx)
    q, k, v = heads(attn.q(x), 3), heads(k_lin, 3), heads(v_lin, 3)
    for mask in (None, padding):
        additive = None if mask is None else as_additive(mask)[:, None, None, :]
        expected = attn.proj(hand_attention(q, k, v, additive).transpose(1, 2).reshape(2, 4, 12))
        torch.testing.assert_close(attn(x, context=ctx, key_padding_mask=mask), expected, atol=1e-5, rtol=1e-5)


def test_packed_and_split_projections_agree_when_weights_are_copied():
    torch.manual_seed(0)
    packed = Attention(12, num_heads=4).eval()
    separate = Attention(12, num_heads=4, qkv_layout="separate").eval()
    q_kv = Attention(12, num_heads=4, qkv_layout="q_kv").eval()
    (wq, wk, wv), (bq, bk, bv) = packed.qkv.weight.chunk(3), packed.qkv.bias.chunk(3)
    with torch.no_grad():
        for name, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
            getattr(separate, name).weight.copy_(w), getattr(separate, name).bias.copy_(b)
        q_kv.q.weight.copy_(wq), q_kv.q.bias.copy_(bq)
        q_kv.kv.weight.copy_(torch.cat([wk, wv])), q_kv.kv.bias.copy_(torch.cat([bk, bv]))
        for m in (separate, q_kv):
            m.proj.load_state_dict(packed.proj.state_dict())
    x, mask = torch.randn(2, 5, 12), torch.ones(5, 5, dtype=torch.bool).tril()
    for m in (separate, q_kv):
        torch.testing.assert_close(m(x, mask), packed(x, mask), atol=1e-6, rtol=1e-6)
        # no context means self-attention
        torch.testing.assert_close(m(x, mask, context=x), packed(x, mask), atol=1e-6, rtol=1e-6)
    # the two cross layouts agree on another sequence too
    ctx = torch.randn(2, 3, 12)
    torch.testing.assert_close(separate(x, context=ctx), q_kv(x, context=ctx), atol=1e-6, rtol=1e-6)


def test_attention_names_and_layout_errors():
    assert list(Attention(8, 2).state_dict()) == ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias"]
    assert list(Attention(8, 2, qk_norm=True).state_dict()) == [
        "qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "q_norm.weight", "q_norm.bias", "k_norm.weight",
        "k_norm.bias"]
    assert [k for k in Attention(8, 2, context_dim=6, qkv_layout="q_kv").state_dict() if k.endswith("weight")] == [
        "q.weight", "kv.weight", "proj.weight"]
    wide = Attention(8, 4, head_dim=5, qkv_layout="q_kv", context_dim=3)
    assert wide.q.weight.shape == (20, 8) and wide.kv.weight.shape == (40, 3) and wide.proj.weight.shape == (8, 20)
    assert wide(torch.randn(2, 4, 8), context=torch.randn(2, 9, 3)).shape == (2, 4, 8)
    with pytest.raises(ValueError, match="packed"):
        Attention(8, 2, context_dim=4)
    with pytest.raises(ValueError, match="packed"):
        Attention(8, 2)(torch.randn(1, 3, 8), context=torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="qkv_layout"):
        Attention(8, 2, qkv_layout="kv_q")


# The state-dict keys of the default blocks before cross-attention and post-norm existed.
VIT_BLOCK_KEYS = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                  "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
                  "mlp.fc2.bias"]
FLEXTOK_BLOCK_KEYS = ["attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight",
                      "modulation.weight", "modulation.bias"]


def test_default_blocks_keep_their_state_dict_keys():
    assert list(TransformerBlock(16, 4).state_dict()) == VIT_BLOCK_KEYS
    flextok = TransformerBlock(16, 4, mlp_kind="swiglu", bias=False, qk_norm=True, norm_affine=False,
                               modulation_dim=16, modulation_groups=2)
    assert list(flextok.state_dict()) == FLEXTOK_BLOCK_KEYS
    assert list(Transformer(16, 2, 4).state_dict()) == [f"blocks.{i}.{k}" for i in range(2) for k in VIT_BLOCK_KEYS]


def ln(x, norm):
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def hand_mha(xq, xkv, w_q, b_q, w_k, b_k, w_v, b_v, w_o, b_o, num_heads, additive=None):
    q, k, v = (heads(t, num_heads) for t in (xq @ w_q.T + b_q, xkv @ w_k.T + b_k, xkv @ w_v.T + b_v))
    out = hand_attention(q, k, v, additive).transpose(1, 2).reshape(xq.shape[0], xq.shape[1], -1)
    return out @ w_o.T + b_o


def randomize_norms(module):
    """Non-trivial LayerNorm affines, so a norm in the wrong place shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))


def test_post_norm_block_equals_a_hand_written_bert_layer():
    torch.manual_seed(0)
    dim, heads_, ctx_dim = 12, 3, 7
    block = TransformerBlock(dim, heads_, norm_position="post", norm_eps=1e-12, cross_attention=True,
                             context_dim=ctx_dim).eval()
    randomize_norms(block)
    x, ctx = torch.randn(2, 5, dim), torch.randn(2, 4, ctx_dim)
    # SEED's causal query mask is additive -10000; the context has padding
    causal = (1.0 - torch.ones(5, 5).tril()) * -10000.0
    ctx_keep = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]).bool()
    out = block(x, causal, context=ctx, context_mask=ctx_keep)

    sa, ca, mlp = block.attn, block.cross_attn, block.mlp
    (wq, wk, wv), (bq, bk, bv) = sa.qkv.weight.chunk(3), sa.qkv.bias.chunk(3)
    h = ln(x + hand_mha(x, x, wq, bq, wk, bk, wv, bv, sa.proj.weight, sa.proj.bias, heads_, causal), block.norm1)
    ctx_add = (1.0 - ctx_keep.float())[:, None, None, :] * -1e9
    h = ln(h + hand_mha(h, ctx, ca.q.weight, ca.q.bias, ca.k.weight, ca.k.bias, ca.v.weight, ca.v.bias,
                        ca.proj.weight, ca.proj.bias, heads_, ctx_add), block.norm_cross)
    inter = h @ mlp.fc1.weight.T + mlp.fc1.bias
    inter = 0.5 * inter * (1 + torch.erf(inter / math.sqrt(2)))  # BERT's exact GELU
    expected = ln(h + inter @ mlp.fc2.weight.T + mlp.fc2.bias, block.norm2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert block.norm1.eps == block.norm_cross.eps == block.norm2.eps == 1e-12


def test_pre_norm_cross_block_equals_hand_computation():
    torch.manual_seed(0)
    block = TransformerBlock(8, 2, cross_attention=True, context_dim=6, cross_qkv_layout="q_kv",
                             context_norm=True).eval()
    randomize_norms(block)
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 6)
    sa, ca = block.attn, block.cross_attn
    (wq, wk, wv), (bq, bk, bv) = sa.qkv.weight.chunk(3), sa.qkv.bias.chunk(3)
    h = x + hand_mha(ln(x, block.norm1), ln(x, block.norm1), wq, bq, wk, bk, wv, bv, sa.proj.weight, sa.proj.bias, 2)
    (wk, wv), (bk, bv) = ca.kv.weight.chunk(2), ca.kv.bias.chunk(2)
    c = ln(ctx, block.norm_context)
    h = h + hand_mha(ln(h, block.norm_cross), c, ca.q.weight, ca.q.bias, wk, bk, wv, bv, ca.proj.weight,
                     ca.proj.bias, 2)
    expected = h + block.mlp(ln(h, block.norm2))
    torch.testing.assert_close(block(x, context=ctx), expected, atol=1e-5, rtol=1e-5)


def test_cross_attention_sub_layer_only_when_enabled():
    torch.manual_seed(0)
    plain = TransformerBlock(8, 2).eval()
    x, ctx, other = torch.randn(2, 3, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    assert not plain.has_cross_attention and not any("cross" in k or "context" in k for k in plain.state_dict())
    # a block without the sub-layer ignores a context it is handed (a stack passes it to every block)
    assert torch.equal(plain(x, context=ctx), plain(x))
    crossing = TransformerBlock(8, 2, cross_attention=True).eval()
    assert crossing.has_cross_attention and [k for k in crossing.state_dict() if "cross" in k] == [
        f"{m}.{p}" for m in ("norm_cross", "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.proj")
        for p in ("weight", "bias")]
    assert not torch.allclose(crossing(x, context=ctx), crossing(x, context=other))
    with pytest.raises(ValueError, match="needs a context"):
        crossing(x)
    # self_attention=False keeps only what remains (an MLP-only sub-layer here)
    mlp_only = TransformerBlock(8, 2, self_attention=False)
    assert list(mlp_only.state_dict()) == [k for k in VIT_BLOCK_KEYS if not k.startswith(("norm1", "attn"))]
    torch.testing.assert_close(mlp_only(x), x + mlp_only.mlp(mlp_only.norm2(x)))


def test_stack_passes_context_also_under_checkpointing():
    torch.manual_seed(0)
    stack = Transformer(8, 2, 2, cross_attention=True, context_dim=4)
    x, ctx = torch.randn(2, 3, 8, requires_grad=True), torch.randn(2, 5, 4)
    keep = torch.tensor([[True] * 5, [True, True, False, False, False]])
    by_hand = stack.blocks[1](stack.blocks[0](x, context=ctx, context_mask=keep), context=ctx, context_mask=keep)
    torch.testing.assert_close(stack(x, context=ctx, context_mask=keep), by_hand)
    stack.gradient_checkpointing = True
    out = stack(x, context=ctx, context_mask=keep)
    torch.testing.assert_close(out, by_hand)
    out.sum().backward()
    assert stack.blocks[0].cross_attn.q.weight.grad.abs().sum() > 0


def test_block_options_for_bert_and_perceiver():
    perceiver_like = TransformerBlock(8, 2, bias=False, norm_bias=True, self_attention=False, cross_attention=True,
                                      cross_qkv_layout="q_kv", context_norm=True, cross_attn_include_self=True)
    sd = perceiver_like.state_dict()
    assert not any(k.endswith("bias") and not k.startswith("norm") for k in sd)  # bias-free linears
    assert all(f"{n}.bias" in sd for n in ("norm_context", "norm_cross", "norm2"))  # biased norms
    with pytest.raises(ValueError, match="pre-norm"):
        TransformerBlock(8, 2, norm_position="post", modulation_dim=8)
    with pytest.raises(ValueError, match="include_self"):
        TransformerBlock(8, 2, cross_attention=True, context_dim=6, cross_attn_include_self=True)
    # dropout only while training
    block = TransformerBlock(8, 2, dropout=0.5, attn_dropout=0.5).eval()
    x = torch.randn(2, 3, 8)
    assert torch.equal(block(x), block(x))
    assert not torch.equal(block.train()(x), block.eval()(x))


def test_mlp_activations():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    for kind, act in (("gelu", lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))),
                      ("gelu_tanh",
                       lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))),
                      ("quick_gelu", lambda h: h * torch.sigmoid(1.702 * h)), ("relu", lambda h: h.clamp_min(0))):
        mlp = MLP(4, 6, kind=kind)
        torch.testing.assert_close(mlp(x), mlp.fc2(act(mlp.fc1(x))), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown MLP kind"):
        MLP(4, 6, kind="mish")
