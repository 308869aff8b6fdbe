"""Query bottlenecks: learned queries, the Q-Former (causal queries, cross-attention every N layers,
text in self-attention only) and the Perceiver resampler."""

import math

import pytest
import torch
import torch.nn.functional as F

from tokenizers_vis.nn.attention import query_text_mask
from tokenizers_vis.nn.bottleneck import LearnedQueries, PerceiverResampler, QFormer

DIM, HEADS, NQ, CTX = 12, 3, 6, 10


def qformer(**kwargs):
    torch.manual_seed(0)
    options = dict(dim=DIM, depth=3, num_heads=HEADS, num_queries=NQ, context_dim=CTX, mlp_ratio=2.0)
    return QFormer(**{**options, **kwargs}).eval()


def test_learned_queries():
    torch.manual_seed(0)
    queries = LearnedQueries(256, 64, init_std=0.02)
    assert queries.weight.shape == (256, 64) and queries.num_queries == 256
    assert abs(queries.weight.std().item() - 0.02) < 0.002
    assert abs(LearnedQueries(256, 64).weight.std().item() - 64 ** -0.5) < 0.01
    batch = queries(3)
    assert batch.shape == (3, 256, 64) and torch.equal(batch[2], queries.weight)


def test_query_text_mask_by_hand():
    # 2 queries, 3 text tokens; causal queries, queries see the text, last text token padded in sample 1
    mask = query_text_mask(2, 3, causal_queries=True, text_padding=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    expected = torch.tensor([[1, 0, 1, 1, 1],
                             [1, 1, 1, 1, 1],
                             [1, 1, 1, 1, 1],
                             [1, 1, 1, 1, 1],
                             [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert mask.shape == (2, 1, 5, 5)
    assert torch.equal(mask[0, 0], expected)
    padded = expected.clone()
    padded[:, 4] = False
    assert torch.equal(mask[1, 0], padded)
    generation = query_text_mask(2, 3, queries_see_text=False, causal_text=True)
    assert torch.equal(generation, torch.tensor([[1, 1, 0, 0, 0],
                                                 [1, 1, 0, 0, 0],
                                                 [1, 1, 1, 0, 0],
                                                 [1, 1, 1, 1, 0],
                                                 [1, 1, 1, 1, 1]], dtype=torch.bool))
    assert query_text_mask(4, 0) is None


def test_qformer_cross_attention_every_n_layers():
    model = qformer(depth=5, cross_attention_every=2)
    assert [b.has_cross_attention for b in model.blocks] == [True, False, True, False, True]
    every_3 = qformer(depth=5, cross_attention_every=3)
    assert [b.has_cross_attention for b in every_3.blocks] == [True, False, False, True, False]
    keys = model.state_dict()
    assert {k.split(".")[1] for k in keys if ".cross_attn." in k} == {"0", "2", "4"}
    assert keys["blocks.0.cross_attn.k.weight"].shape == (DIM, CTX)
    # the features reach only the layers that have the sub-layer
    seen = []
    for i, block in enumerate(model.blocks):
        if block.has_cross_attention:
            block.cross_attn.register_forward_hook(lambda m, args, kwargs, out, i=i: seen.append(
                (i, args[0].shape, kwargs["context"].shape)), with_kwargs=True)
    out = model(torch.randn(2, 7, CTX))
    assert out.shape == (2, NQ, DIM)
    assert seen == [(i, (2, NQ, DIM), (2, 7, CTX)) for i in (0, 2, 4)]


def test_causal_queries_never_see_later_queries():
    features = torch.randn(2, 7, CTX)
    j = 3
    for causal in (True, False):
        model = qformer(causal_queries=causal)
        queries = model.queries(2)
        probe = queries.clone()
        probe[:, j] += torch.randn(DIM)
        out, out_probe = model(features), model(features, queries=probe)
        torch.testing.assert_close(out, model(features, queries=queries))
        if causal:
            torch.testing.assert_close(out_probe[:, :j], out[:, :j], atol=1e-6, rtol=0)
        else:
            assert (out_probe[:, :j] - out[:, :j]).abs().max() > 1e-3
        assert (out_probe[:, j:] - out[:, j:]).abs().max() > 1e-3


def test_text_sees_the_image_only_through_the_queries():
    features, other = torch.randn(2, 7, CTX), torch.randn(2, 7, CTX)
    text = torch.randn(2, 4, DIM)
    # one layer: self-attention runs before the (query-only) cross-attention, so the text output
    # cannot depend on the features at all, while the queries' output does
    one = qformer(depth=1)
    out, out_other = one(features, text), one(features=other, text=text)
    assert out.shape == (2, NQ + 4, DIM)
    torch.testing.assert_close(out[:, NQ:], out_other[:, NQ:], atol=0, rtol=0)
    assert (out[:, :NQ] - out_other[:, :NQ]).abs().max() > 1e-3
    # two layers: the image reaches the text through the queries in the second self-attention
    two = qformer(depth=2)
    assert (two(features, text)[:, NQ:] - two(other, text)[:, NQ:]).abs().max() > 1e-3
    # cross-attention reads only the query rows
    rows = []
    two.blocks[0].cross_attn.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    two(features, text)
    assert rows == [NQ]


def test_qformer_text_options():
    features, text = torch.randn(2, 7, CTX), torch.randn(2, 4, DIM)
    model = qformer()
    assert len(model.text_blocks) == 3 and not any(b.has_self_attention for b in model.text_blocks)
    # padded text never reaches the queries
    keep = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    changed = text.clone()
    changed[1, 2:] = torch.randn(2, DIM)
    a, b = model(features, text, text_mask=keep), model(features, changed, text_mask=keep)
    torch.testing.assert_close(a[:, :NQ], b[:, :NQ], atol=1e-6, rtol=0)
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)
    # queries that do not see the text ignore it entirely
    blind = qformer(queries_see_text=False)
    torch.testing.assert_close(blind(features, text)[:, :NQ], blind(features), atol=1e-6, rtol=0)
    # text alone (no queries, no cross-attention): the unimodal text encoder
    alone = model(text=text)
    assert alone.shape == (2, 4, DIM)
    assert torch.isfinite(alone).all()
    # one shared MLP for queries and text
    shared = qformer(separate_text_mlp=False)
    assert not hasattr(shared, "text_blocks") and not any(k.startswith("text_blocks") for k in shared.state_dict())
    with pytest.raises(ValueError, match="needs features, text"):
        model()


def test_qformer_norm_positions():
    post = qformer()
    assert post.blocks[0].norm_position == "post" and post.blocks[0].norm1.eps == 1e-12
    assert isinstance(post.input_norm, torch.nn.LayerNorm) and isinstance(post.final_norm, torch.nn.Identity)
    pre = qformer(norm_position="pre", norm_eps=1e-6)
    assert isinstance(pre.input_norm, torch.nn.Identity) and isinstance(pre.final_norm, torch.nn.LayerNorm)
    # the post-norm Q-Former is the chain of its blocks' sub-layers, queries first
    features = torch.randn(2, 7, CTX)
    x = post.input_norm(post.queries(2))
    for block in post.blocks:
        x = block(x, context=features) if block.has_cross_attention else block(x)
    torch.testing.assert_close(post(features), x)


@pytest.mark.parametrize("kind", ["qformer", "perceiver"])
def test_gradients_reach_the_learned_queries(kind):
    model = qformer(causal_queries=True) if kind == "qformer" else PerceiverResampler(8, 2, 2, num_latents=4)
    features = torch.randn(2, 7, CTX if kind == "qformer" else 8)
    model.train()(features).square().sum().backward()
    queries = model.queries if kind == "qformer" else model.latents
    assert queries.weight.grad is not None and queries.weight.grad.abs().min() > 0


def perceiver():
    torch.manual_seed(0)
    return PerceiverResampler(dim=8, depth=2, num_heads=2, head_dim=6, num_latents=5, input_dim=10, output_dim=4,
                              input_proj=True).eval()


def test_perceiver_structure():
    model = perceiver()
    keys = set(model.state_dict())
    assert {"latents.weight", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias", "norm_out.weight",
            "norm_out.bias"} <= keys
    assert model.latents.weight.shape == (5, 8)
    layer = {k.split(".", 2)[2]: v.shape for k, v in model.state_dict().items() if k.startswith("layers.0.")}
    assert layer == {"norm_context.weight": (8,), "norm_context.bias": (8,), "norm_cross.weight": (8,),
                     "norm_cross.bias": (8,), "cross_attn.q.weight": (12, 8), "cross_attn.kv.weight": (24, 8),
                     "cross_attn.proj.weight": (8, 12), "norm2.weight": (8,), "norm2.bias": (8,),
                     "mlp.fc1.weight": (32, 8), "mlp.fc2.weight": (8, 32)}
    flamingo = PerceiverResampler(8, 1, 2, num_latents=3)
    assert isinstance(flamingo.proj_in, torch.nn.Identity) and isinstance(flamingo.proj_out, torch.nn.Identity)
    assert flamingo(torch.randn(2, 4, 8)).shape == (2, 3, 8)


def test_perceiver_layer_equals_hand_computation():
    model = perceiver()
    x = torch.randn(2, 7, 10)
    h = model.proj_in(x)
    lat = model.latents.weight.expand(2, -1, -1)
    for layer in model.layers:
        ln = lambda t, n: F.layer_norm(t, (8,), n.weight, n.bias, n.eps)  # noqa: E731
        ctx, q_in = ln(h, layer.norm_context), ln(lat, layer.norm_cross)
        kv_in = torch.cat([ctx, q_in], dim=1)  # keys/values: inputs and latents
        attn = layer.cross_attn
        q = (q_in @ attn.q.weight.T).view(2, 5, 2, 6).transpose(1, 2)
        k, v = (kv_in @ attn.kv.weight.T).view(2, 12, 2, 2, 6).permute(2, 0, 3, 1, 4)
        # Flamingo/Divot scale q and k by dim_head^-0.25 each
        weights = ((q * 6 ** -0.25) @ (k * 6 ** -0.25).transpose(-1, -2)).softmax(-1)
        lat = lat + (weights @ v).transpose(1, 2).reshape(2, 5, 12) @ attn.proj.weight.T
        hid = ln(lat, layer.norm2) @ layer.mlp.fc1.weight.T
        lat = lat + (0.5 * hid * (1 + torch.erf(hid / math.sqrt(2)))) @ layer.mlp.fc2.weight.T
    expected = F.layer_norm(model.proj_out(lat), (4,), model.norm_out.weight, model.norm_out.bias, 1e-5)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_perceiver_depends_on_inputs_and_latents_and_respects_padding():
    model = perceiver()
    x = torch.randn(2, 7, 10)
    out = model(x)
    assert out.shape == (2, 5, 4)
    assert (model(torch.randn(2, 7, 10)) - out).abs().max() > 1e-3
    with torch.no_grad():
        model.latents.weight.add_(torch.randn(5, 8))
    assert (model(x) - out).abs().max() > 1e-3
    keep = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    changed = x.clone()
    changed[1, 4:] = torch.randn(3, 10)
    torch.testing.assert_close(model(x, keep), model(changed, keep), atol=1e-6, rtol=0)
    assert (model(x, keep)[1] - model(x)[1]).abs().max() > 1e-4
