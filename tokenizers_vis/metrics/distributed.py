"""Cross-rank sums for metric state.

Every metric keeps plain sums (counts, float64 sums, histograms) so that combining ranks is
one all-reduce; each image is counted once when each rank sees disjoint images. All helpers
are no-ops without an initialised process group, and every rank must call them in the same
order (they are collectives).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tokenizers_vis.nn.distributed import is_distributed

__all__ = ["is_distributed", "communication_device", "all_reduce_sum", "all_reduce_max_int"]


def communication_device() -> torch.device:
    """The device a collective needs its tensors on: NCCL only reduces CUDA tensors."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks, as a new tensor on ``tensor``'s device (the input is unchanged)."""
    if not is_distributed():
        return tensor.clone()
    buffer = tensor.detach().to(communication_device(), copy=True)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(tensor.device)


def all_reduce_max_int(value: int) -> int:
    """Largest ``value`` over ranks; used to agree on sizes a rank without data does not know."""
    if not is_distributed():
        return value
    buffer = torch.tensor([value], dtype=torch.int64, device=communication_device())
    dist.all_reduce(buffer, op=dist.ReduceOp.MAX)
    return int(buffer.item())
