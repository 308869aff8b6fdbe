"""Rank-consistent state for parts that keep statistics (quantizer usage, GAN regulariser
averages): under DDP each rank must end a step with the same buffers, since a checkpoint saves one
rank's. No-ops without an initialised process group of more than one rank; every rank must call
the collectives in the same order."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "all_reduce_mean"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks, as a new tensor (the input is unchanged); a copy in one process."""
    if not is_distributed():
        return tensor.clone()
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()
