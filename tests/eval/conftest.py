"""Fixtures for the evaluation tests: a tiny saved TiTok, 7 images as PNG files and as shards,
an empty torch hub cache (no Inception / VGG weights), and composing conf/eval.yaml."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import eval_testing`, also in workers

from eval_testing import NUM_IMAGES, make_image_folder, save_tiny_tokenizer  # noqa: E402

from tokenizers_vis.data import write_shards  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return save_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tiny")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images") / "pngs")


@pytest.fixture(scope="session")
def shard_pattern(image_folder, tmp_path_factory) -> str:
    """The same images as webdataset shards (3 per shard), as a brace pattern."""
    out = tmp_path_factory.mktemp("shards")
    files = sorted(image_folder.glob("*.png"))
    samples = ({"__key__": f.stem, "png": f.read_bytes()} for f in files)
    paths = write_shards(samples, out, "val", 3)
    assert len(paths) == 3 and NUM_IMAGES == len(files)
    return f"{out}/val-{{000000..000002}}.tar"


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch) -> Path:
    """No cached weights, in this process and in subprocesses (TORCH_HOME)."""
    home = tmp_path / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(home / "hub"))
    return home
