"""Codebook usage, entropy and perplexity on known histograms."""

from __future__ import annotations

import math

import pytest
import torch

from tokenizers_vis.metrics import CodebookUsage


def test_uniform_over_half_the_codebook():
    usage = CodebookUsage(8)
    usage.update(torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]))
    assert usage.usage() == pytest.approx(0.5)
    assert usage.entropy() == pytest.approx(2.0)  # bits
    assert usage.perplexity() == pytest.approx(4.0)


def test_skewed_histogram_streamed_in_chunks():
    usage = CodebookUsage(4)
    for chunk in ([0, 0], [0], [1]):
        usage.update(torch.tensor(chunk))
    bits = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    stats = usage.compute()
    assert stats["usage"] == pytest.approx(0.5)
    assert stats["entropy_bits"] == pytest.approx(bits)
    assert stats["perplexity"] == pytest.approx(2**bits)
    assert stats["total"] == 4
    assert usage.histogram.tolist() == [3, 1, 0, 0]


def test_empty_and_reset():
    usage = CodebookUsage(5)
    assert usage.compute() == {"usage": 0.0, "entropy_bits": 0.0, "perplexity": 1.0, "total": 0}
    usage.update(torch.arange(5))
    assert usage.usage() == 1.0 and usage.perplexity() == pytest.approx(5.0)
    usage.reset()
    assert usage.compute()["total"] == 0


def test_rejects_out_of_range_and_float_ids():
    usage = CodebookUsage(4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        usage.update(torch.tensor([0, 4]))
    with pytest.raises(ValueError):
        usage.update(torch.tensor([-1]))
    with pytest.raises(TypeError):
        usage.update(torch.tensor([0.0, 1.0]))
