"""Two gloo processes, each measuring half the images, give the one-process numbers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp
from metrics_ddp_worker import NUM_IMAGES, eval_set, measure, worker

WORLD_SIZE = 2


# Forked workers reuse this process's imports (torch, torchvision, torchmetrics): with spawn,
# re-importing them in two processes on a 2-core machine takes ~15 s, forking ~1 s. The worker
# sets one thread before computing, as DataLoader workers do, so OpenMP is fork-safe here.
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def test_sharded_metrics_equal_single_process(tmp_path):
    args = (WORLD_SIZE, str(tmp_path / "pg_init"), str(tmp_path))
    mp.start_processes(worker, args=args, nprocs=WORLD_SIZE, start_method=START_METHOD)
    single = measure(*eval_set())
    assert single["num_images"] == NUM_IMAGES
    for rank in range(WORLD_SIZE):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        sharded = saved["metrics"]
        assert sharded["num_images"] == NUM_IMAGES  # each image counted once
        assert sharded.keys() == single.keys()
        for key, value in single.items():
            if key == "lpips":
                assert value is None and sharded[key] is None
                continue
            # Per-image float32 convolutions may round differently with another batch split.
            assert sharded[key] == pytest.approx(value, rel=1e-6), key
        assert math.isfinite(sharded["rfid"]) and sharded["codebook_usage"] == pytest.approx(0.5)

        stats = saved["stats"]
        assert stats["n"] == 4 and stats["dim"] == 3
        torch.testing.assert_close(stats["sum"], torch.arange(12.0, dtype=torch.float64).reshape(4, 3).sum(0))
