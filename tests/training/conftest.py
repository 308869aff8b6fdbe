"""Fixtures shared by the training tests."""

import pytest


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A data folder holding small demo shards (64 train / 16 val images), built once per session."""
    from tokenizers_vis.data import ensure_demo_shards

    data_dir = tmp_path_factory.mktemp("data")
    ensure_demo_shards(data_dir / "demo", num_train=64, num_val=16, shard_size=32)
    return data_dir
