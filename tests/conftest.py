"""Test-wide settings: no network, no wandb, one thread, deterministic seeds, paths to the repo and shared/."""

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

# One thread: the tiny models of the tests run faster single-threaded, and subprocess runs with
# data workers would otherwise oversubscribe the 2 cores (measured: up to 10x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import helpers` from any test
from helpers import SHARED  # noqa: E402  (the path above makes it importable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if "LOCAL_RANK" not in os.environ:
    # DDP tests launch children that inherit this; only the parent picks the port.
    os.environ.setdefault("MASTER_PORT", str(free_port()))

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        from helpers import missing_fixture

        missing_fixture(f"{SHARED} is absent: the reference fixtures ship only with the development checkout")
    return SHARED
