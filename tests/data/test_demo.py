import json

import torch

from tokenizers_vis.data import build_demo_shards, ensure_demo_shards, make_eval_loader
from tokenizers_vis.data.demo import main


def test_build_demo_shards_small(tmp_path):
    info = build_demo_shards(tmp_path, num_train=20, num_val=6, size=24, shard_size=8, seed=1)
    assert [p.split("/")[-1] for p in info["train"]] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [p.split("/")[-1] for p in info["val"]] == ["val-000000.tar"]
    assert "astronaut" in info["classes"] and len(info["classes"]) >= 8
    assert json.loads((tmp_path / "classes.json").read_text()) == info["classes"]
    train = list(make_eval_loader(info["train_pattern"], 24, 8))
    assert sum(len(b["key"]) for b in train) == 20
    assert all(b["image"].shape[1:] == (3, 24, 24) for b in train)
    labels = torch.cat([b["label"] for b in train])
    assert labels.min() >= 0 and labels.max() < len(info["classes"]) and len(labels.unique()) > 3
    images = torch.cat([b["image"] for b in train])
    assert images.std() > 0.1
    val = next(iter(make_eval_loader(info["val_pattern"], 24, 8)))
    assert val["key"] == [f"val_{i:06d}" for i in range(6)]
    # Val crops are different draws from train ones.
    assert not any(torch.equal(v, t) for v in val["image"] for t in images)
    assert not list(tmp_path.glob(".build-*"))


def test_ensure_builds_once_and_rebuilds_on_new_arguments(tmp_path, capsys):
    first = ensure_demo_shards(tmp_path, num_train=8, num_val=2, size=16, shard_size=4)
    stamp = (tmp_path / "train-000000.tar").stat().st_mtime_ns
    data = (tmp_path / "train-000001.tar").read_bytes()
    assert ensure_demo_shards(tmp_path, num_train=8, num_val=2, size=16, shard_size=4) == first
    assert (tmp_path / "train-000000.tar").stat().st_mtime_ns == stamp
    main([str(tmp_path), "--num-train", "4", "--num-val", "2", "--size", "16", "--shard-size", "4"])
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == f"{tmp_path}/train-{{000000..000000}}.tar"
    assert not (tmp_path / "train-000001.tar").exists()
    # Rebuilding the first arguments gives the same bytes (seeded, fixed tar mtime).
    build_demo_shards(tmp_path, num_train=8, num_val=2, size=16, shard_size=4)
    assert (tmp_path / "train-000001.tar").read_bytes() == data
