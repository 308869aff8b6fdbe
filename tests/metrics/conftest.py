"""Fixtures for the metric tests; makes `metrics_testing` importable (also by spawned DDP workers)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def empty_hub_dir(tmp_path, monkeypatch):
    """An empty torch hub cache, so a real cached weight file cannot mask a test."""
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(hub))
    return hub
