import pytest
import torch
import torch.nn.functional as F

from tokenizers_vis.nn.attention import Attention, build_mask, causal_mask, prefix_causal_mask


def test_prefix_causal_mask_equals_hand_built():
    mask = prefix_causal_mask(3, 2)
    expected = torch.tensor([
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_build_mask_by_name():
    assert build_mask("full", 4) is None
    assert torch.equal(build_mask("causal", 4), causal_mask(4))
    assert torch.equal(build_mask("prefix_causal", 5, num_prefix=3), prefix_causal_mask(3, 2))
    with pytest.raises(ValueError, match="unknown attention mask"):
        build_mask("sparse", 4)


def test_attention_matches_explicit_softmax():
    attn = Attention(16, num_heads=4).eval()
    x = torch.randn(2, 5, 16)
    mask = causal_mask(5)
    q, k, v = attn.qkv(x).view(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) / 2.0
    scores = scores.masked_fill(~mask, float("-inf"))
    expected = attn.proj((F.softmax(scores, -1) @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x, mask), expected, atol=1e-5, rtol=1e-5)


def test_causal_attention_ignores_the_future():
    attn = Attention(8, num_heads=2).eval()
    x = torch.randn(1, 6, 8)
    y = x.clone()
    y[:, 4:] = torch.randn(1, 2, 8)
    mask = causal_mask(6)
    torch.testing.assert_close(attn(x, mask)[:, :4], attn(y, mask)[:, :4])


def test_width_must_divide_heads():
    with pytest.raises(ValueError, match="not divisible"):
        Attention(10, num_heads=3)
