"""Smoke tests of the benchmark scripts: tiny configs, a couple of steps, the JSON they write.

They check that the scripts run and report positive numbers; speed itself is never asserted.
One torch thread: on a busy machine, two threads waiting on each other make tiny steps ~50x slower.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizers_vis.data.shards import write_shards

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def scripts():
    """The benchmark scripts as modules (they import their sibling `common` by plain name)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield {name: importlib.import_module(name) for name in ("train_throughput", "eval_throughput",
                                                                "data_throughput")}
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(autouse=True)
def _restore_process_state():
    """The scripts set the thread count and quieten Lightning's loggers for the whole process."""
    threads = torch.get_num_threads()
    names = ("lightning", "lightning.pytorch", "lightning.fabric")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    torch.set_num_threads(threads)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def read_results(path):
    payload = json.loads(path.read_text())
    assert payload["machine"]["torch"] and payload["machine"]["cpu_cores"] >= 1
    return payload["results"]


def test_train_throughput(scripts, tmp_path):
    out = tmp_path / "train.json"
    scripts["train_throughput"].main([
        "--experiment", "titok_b", "--tiny", "--device", "cpu", "--resolution", "32", "--batch", "2",
        "--steps", "2", "--warmup", "1", "--threads", "1", "--set", "model.objective.lpips_weight=0",
        "--set", "model.objective.convnext_weight=0", "--json", str(out)])
    result = read_results(out)
    assert (result["resolution"], result["batch"], result["tokens"], result["steps"]) == (32, 2, 8, 2)
    assert result["gan"] is True  # the discriminator's loss and optimizer were part of the step
    for key in ("images_per_sec", "step_ms", "params_m", "disc_params_m", "gflop_per_image", "achieved_gflops",
                "peak_mem_mb"):
        assert result[key] > 0, key
    assert result["delta_mem_mb"] >= 0 and 0 <= result["loop_overhead_pct"] < 100


def test_eval_throughput(scripts, tmp_path):
    out = tmp_path / "eval.json"
    scripts["eval_throughput"].main([
        "--experiment", "demo", "--tiny", "--device", "cpu", "--resolution", "32", "--batch", "2",
        "--repeats", "2", "--warmup", "1", "--threads", "1", "--json", str(out)])
    result = read_results(out)
    assert (result["resolution"], result["batch"], result["metrics"]) == (32, 2, "basic")
    for key in ("encode_images_per_sec", "decode_images_per_sec", "full_images_per_sec", "params_m", "peak_mem_mb"):
        assert result[key] > 0, key
    assert result["compute_seconds"] >= 0


def test_data_throughput(scripts, tmp_path):
    rng = np.random.default_rng(0)

    def samples():
        for i in range(16):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buffer, format="PNG")
            yield {"__key__": f"{i:04d}", "png": buffer.getvalue(), "cls": i % 2}

    write_shards(samples(), tmp_path / "shards", "train", 8)
    out = tmp_path / "data.json"
    scripts["data_throughput"].main([
        "--shards", str(tmp_path / "shards"), "--resolution", "32", "--batch", "4", "--workers", "0", "1",
        "--batches", "2", "--warmup", "1", "--shuffle-buffer", "4", "--json", str(out)])
    rows = read_results(out)
    assert [row["workers"] for row in rows] == [0, 1]
    for row in rows:
        assert row["images_per_sec"] > 0 and row["batch_ms"] > 0 and row["first_batch_s"] > 0


def test_ema_memory_reports_the_copy_owning_only_trainable_parameters():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        ema_memory = importlib.import_module("ema_memory")
    finally:
        sys.path.remove(str(BENCHMARKS))
    full = ema_memory.measure("full_copy", width=64, depth=1)
    ours = ema_memory.measure("trainable_only", width=64, depth=1)
    assert full["frozen_params"] > 0 and full["ema_own_params"] == full["frozen_params"] + full["trainable_params"]
    assert ours["ema_own_params"] == ours["trainable_params"]
