"""Shared parts (no training logic, no I/O). The attention, block and query-bottleneck families are
re-exported here; everything else is imported from its submodule."""

from tokenizers_vis.nn.attention import Attention, attend, build_mask, causal_mask, merge_masks, query_text_mask
from tokenizers_vis.nn.bottleneck import LearnedQueries, PerceiverResampler, QFormer
from tokenizers_vis.nn.transformer import MLP, Transformer, TransformerBlock

__all__ = [
    "MLP", "Attention", "LearnedQueries", "PerceiverResampler", "QFormer", "Transformer", "TransformerBlock",
    "attend", "build_mask", "causal_mask", "merge_masks", "query_text_mask",
]
