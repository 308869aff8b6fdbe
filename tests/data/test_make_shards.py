import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tokenizers_vis.data import make_eval_loader, resolve_shards

from .conftest import random_image

SCRIPT = Path(__file__).resolve().parents[2] / "data" / "make_shards.py"


@pytest.fixture(scope="module")
def make_shards():
    spec = importlib.util.spec_from_file_location("make_shards", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # Registered so that the decoding pool can pickle `make_shards.encode` by name.
    sys.modules["make_shards"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["make_shards"]


def run(make_shards, capsys, *argv, workers=1):
    code = make_shards.main([str(a) for a in argv] + ["--workers", str(workers)])
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err


def tar_members(paths):
    members = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                members[member.name] = tar.extractfile(member).read()
    return members


def test_flat_folder_keeps_bytes_reencodes_others_and_skips_unreadable(tmp_path, make_shards, capsys):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    random_image(rng).save(src / "a.jpg")
    random_image(rng).save(src / "nested" / "b.v2.png")
    random_image(rng).save(src / "c.bmp")
    for i in range(4):
        random_image(rng).save(src / f"d{i}.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    full = io.BytesIO()
    random_image(rng).save(full, format="PNG")
    (src / "truncated.png").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])

    code, out, err = run(make_shards, capsys, src, tmp_path / "out", "--shard-size", 3, "--prefix", "val")
    assert code == 0
    assert "wrote 7 images to 3 shards, skipped 2 unreadable" in err
    assert "broken.jpg" in err and "truncated.png" in err
    assert out[-1] == f"{tmp_path / 'out'}/val-{{000000..000002}}.tar"
    paths = resolve_shards(out[-1])
    assert [Path(p).name for p in paths] == sorted(p.name for p in (tmp_path / "out").glob("*.tar"))
    members = tar_members(paths)
    assert members["a.jpg"] == (src / "a.jpg").read_bytes()
    assert members["nested/b_v2.png"] == (src / "nested" / "b.v2.png").read_bytes()
    assert members["c.png"].startswith(b"\x89PNG")
    assert not any(name.endswith(".cls") for name in members)
    assert not (tmp_path / "out" / "classes.json").exists()
    keys = [k for b in make_eval_loader(out[-1], 16, 4) for k in b["key"]]
    assert sorted(keys) == sorted(["a", "nested/b_v2", "c", "d0", "d1", "d2", "d3"])

    with pytest.raises(SystemExit):
        make_shards.main([str(src), str(tmp_path / "out"), "--prefix", "val"])
    assert "--overwrite" in capsys.readouterr().err


def test_imagefolder_tree_keeps_labels_and_class_names(tmp_path, make_shards, capsys):
    rng = np.random.default_rng(1)
    src = tmp_path / "tree"
    counts = {"zebra": 3, "ant": 2, "moth": 4}
    for name, n in counts.items():
        (src / name).mkdir(parents=True)
        for i in range(n):
            random_image(rng).save(src / name / f"{name}_{i}.png")
    out_dir = tmp_path / "out"
    code, out, err = run(make_shards, capsys, src, out_dir, "--shard-size", 4, "--max-images", 8, workers=2)
    assert code == 0 and "wrote 8 images to 2 shards" in err
    assert out[-1] == f"{out_dir}/train-{{000000..000001}}.tar"
    classes = json.loads((out_dir / "classes.json").read_text())
    assert classes == ["ant", "moth", "zebra"]
    seen = {}
    for batch in make_eval_loader(out[-1], 16, 3):
        for key, label in zip(batch["key"], batch["label"].tolist()):
            seen[key] = label
    assert len(seen) == 8
    for key, label in seen.items():
        assert key.split("/")[0] == classes[label]
    # Shuffled order by default: classes are mixed within the first shard.
    first = tar_members([out_dir / "train-000000.tar"])
    assert len({name.split("/")[0] for name in first}) > 1

    code, out, _ = run(make_shards, capsys, src, out_dir, "--flat", "--no-shuffle", "--overwrite", "--shard-size", 100)
    assert code == 0 and out[-1].endswith("train-{000000..000000}.tar")
    assert not (out_dir / "train-000001.tar").exists()
    names = list(tar_members([out_dir / "train-000000.tar"]))
    assert names == sorted(names) and not any(n.endswith(".cls") for n in names)
