"""Worker for the 2-process metric test (a plain module, so spawned processes can import it)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from metrics_testing import TinyFeatureNet, degrade, natural_images

from tokenizers_vis.metrics import FeatureStats, ReconstructionMetrics

NUM_IMAGES = 12
CODEBOOK_SIZE = 16


def eval_set() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    real = natural_images(NUM_IMAGES, 32, 32, seed=0)
    ids = torch.randint(0, CODEBOOK_SIZE // 2, (NUM_IMAGES, 4), generator=torch.Generator().manual_seed(0))
    return real, degrade(real), ids


def build_metrics() -> ReconstructionMetrics:
    # LPIPS is left out to keep the test fast: its sum is reduced in the same vector as PSNR/SSIM.
    return ReconstructionMetrics(codebook_size=CODEBOOK_SIZE, fid=TinyFeatureNet(dim=8), lpips=False)


def measure(real: torch.Tensor, recon: torch.Tensor, ids: torch.Tensor) -> dict:
    metrics = build_metrics()
    for r, f, i in zip(real.split(4), recon.split(4), ids.split(4)):
        metrics.update(r, f, i)
    return metrics.compute()


def worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        real, recon, ids = eval_set()
        shard = slice(rank * NUM_IMAGES // world_size, (rank + 1) * NUM_IMAGES // world_size)
        result = measure(real[shard], recon[shard], ids[shard])
        # Only rank 0 has features: the others must still join the reduction with zeros.
        stats = FeatureStats()
        if rank == 0:
            stats.update(torch.arange(12.0).reshape(4, 3))
        torch.save({"metrics": result, "stats": stats.all_reduce().state_dict()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
