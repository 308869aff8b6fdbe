import json

import numpy as np

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


def test_validation_holds_whole_photos_that_training_never_sees(tmp_path):
    from PIL import Image

    from tokenizers_vis.data.demo import FACES, HELD_OUT_PHOTOS, SYNTHETIC, _load_photo, held_out_views

    info = build_demo_shards(tmp_path, num_train=200, num_val=64, size=32, shard_size=100, seed=0)
    classes = info["classes"]
    train = [b for b in make_eval_loader(info["train_pattern"], 32, 50)]
    val = [b for b in make_eval_loader(info["val_pattern"], 32, 64)]
    train_names = {classes[i] for b in train for i in b["label"].tolist()}
    val_names = [classes[i] for b in val for i in b["label"].tolist()]
    held_out = set(info["held_out"]) - {FACES}
    assert held_out == set(HELD_OUT_PHOTOS) and not train_names & held_out
    assert SYNTHETIC in train_names and FACES in train_names and set(val_names) == held_out | {FACES}
    # The first val image is the centre square of the first held-out photo, whole (no random crop).
    photo = Image.fromarray(_load_photo(HELD_OUT_PHOTOS[0]))
    expected = torch.from_numpy(np.array(held_out_views(photo, 32)[0])).permute(2, 0, 1).float() / 255
    assert torch.equal(val[0]["image"][0], expected) and val_names[0] == HELD_OUT_PHOTOS[0]
    # Held-out faces are not training faces.
    train_images = torch.cat([b["image"] for b in train])
    val_faces = torch.cat([b["image"] for b in val])[[n == FACES for n in val_names]]
    assert len(val_faces) >= 4 and not any(torch.equal(f, t) for f in val_faces for t in train_images)
    # Tinted grey photos and synthetic images bring colour: training images are not mostly grey.
    saturation = train_images.amax(dim=1) - train_images.amin(dim=1)
    assert (saturation.mean(dim=(1, 2)) > 0.1).float().mean() > 0.5


def test_demo_module_rebuilds_a_set_of_an_older_layout_and_keeps_a_current_one(tmp_path, monkeypatch):
    import tokenizers_vis.data.demo as demo
    from tokenizers_vis.data import DemoDataModule

    build_demo_shards(tmp_path, num_train=8, num_val=2, size=16, shard_size=4)  # current layout, small
    rebuilt = []
    monkeypatch.setattr(demo, "ensure_demo_shards", lambda out_dir: rebuilt.append(out_dir))
    module = DemoDataModule(demo_dir=str(tmp_path), resolution=16, batch_size=2, num_workers=0)
    module.prepare_data()
    assert rebuilt == []  # kept, although built with other arguments than the defaults
    manifest = json.loads((tmp_path / "demo.json").read_text())
    (tmp_path / "demo.json").write_text(json.dumps({**manifest, "version": 1}))  # crops of the val photos
    module.prepare_data()
    assert rebuilt == [str(tmp_path)]
    (tmp_path / "demo.json").unlink()  # shards put there by hand, no manifest: the user's, kept
    module.prepare_data()
    assert rebuilt == [str(tmp_path)]
