"""The worker of the 2-process video evaluation test (a plain module: forked workers import it)."""

from __future__ import annotations

from pathlib import Path

import torch


def video_worker(rank: int, world_size: int, init_file: str, out_dir: str, cfg, conf_dir: str) -> None:
    import torch.distributed as dist

    from tokenizers_vis.video_evaluation import run_video_evaluation

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        record = run_video_evaluation(cfg, conf_dir=conf_dir)
        torch.save(record, Path(out_dir) / f"video_rank{rank}.pt")
    finally:
        dist.destroy_process_group()
