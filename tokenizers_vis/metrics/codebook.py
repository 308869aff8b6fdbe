"""Codebook usage over a whole evaluation set: a streaming histogram of token ids.

Usage is the fraction of codes used at least once; entropy is that of the empirical code
distribution, in bits (log base 2, so a uniform codebook of size K has log2 K bits);
perplexity is exp(entropy in nats) = 2 ** (entropy in bits), the effective number of codes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokenizers_vis.metrics.distributed import all_reduce_sum

__all__ = ["CodebookUsage"]


class CodebookUsage:
    """Histogram of code ids (int64 bincount), summed over ranks when read.

    ``usage()``, ``entropy()``, ``perplexity()`` and ``compute()`` all-reduce the histogram, so
    under DDP every rank must call them; ``compute()`` does it once for all three.
    """

    def __init__(self, codebook_size: int):
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be positive, got {codebook_size}")
        self.codebook_size = codebook_size
        self.reset()

    def reset(self) -> None:
        self.histogram = torch.zeros(self.codebook_size, dtype=torch.int64)

    def update(self, ids: Tensor) -> None:
        """Count ids of any shape; every id must be in [0, codebook_size)."""
        ids = ids.detach().reshape(-1)
        if ids.numel() == 0:
            return
        if ids.is_floating_point():
            raise TypeError(f"code ids must be integers, got {ids.dtype}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.codebook_size:
            raise ValueError(f"code ids must lie in [0, {self.codebook_size}), got range [{low}, {high}]")
        if self.histogram.device != ids.device:
            self.histogram = self.histogram.to(ids.device)
        self.histogram += torch.bincount(ids.long(), minlength=self.codebook_size)

    def global_histogram(self) -> Tensor:
        """The histogram summed over ranks (a new tensor)."""
        return all_reduce_sum(self.histogram)

    def usage(self) -> float:
        return self.compute()["usage"]

    def entropy(self) -> float:
        """Entropy of the code distribution in bits."""
        return self.compute()["entropy_bits"]

    def perplexity(self) -> float:
        return self.compute()["perplexity"]

    def compute(self) -> dict[str, float | int]:
        """``usage``, ``entropy_bits``, ``perplexity`` and ``total`` (ids counted) over all ranks.

        With no ids counted: usage 0, entropy 0 bits, perplexity 1.
        """
        hist = self.global_histogram().double()
        total = hist.sum().item()
        if total == 0:
            return {"usage": 0.0, "entropy_bits": 0.0, "perplexity": 1.0, "total": 0}
        p = hist[hist > 0] / total
        entropy_nats = -(p * p.log()).sum().item()
        return {
            "usage": (hist > 0).double().mean().item(),
            "entropy_bits": entropy_nats / math.log(2.0),
            "perplexity": math.exp(entropy_nats),
            "total": int(total),
        }
