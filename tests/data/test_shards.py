import tarfile

import pytest

from tokenizers_vis.data.shards import brace_pattern, resolve_shards, write_shards

from .conftest import NUM_IMAGES, SHARD_SIZE


def test_write_shards_names_and_splits(tmp_path, samples):
    paths = write_shards(samples, tmp_path, "train", SHARD_SIZE)
    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
    assert names[:3] == ["img000.cls", "img000.png", "img001.jpg"]
    with tarfile.open(paths[2]) as tar:
        assert len({n.split(".")[0] for n in tar.getnames()}) == NUM_IMAGES - 2 * SHARD_SIZE


def test_write_shards_is_byte_reproducible_and_removes_stale(tmp_path, samples):
    first = [p.read_bytes() for p in write_shards(samples, tmp_path, "train", 2)]
    assert len(first) == 6
    paths = write_shards(samples, tmp_path, "train", SHARD_SIZE)
    assert sorted(p.name for p in tmp_path.glob("train-*.tar")) == [p.name for p in paths]
    again = write_shards(samples, tmp_path / "again", "train", 2)
    assert [p.read_bytes() for p in again] == first


def test_write_shards_rejects_dotted_keys_and_prefixes(tmp_path):
    with pytest.raises(ValueError, match="dot"):
        write_shards([{"__key__": "a.b", "png": b"x"}], tmp_path, "train", 4)
    with pytest.raises(ValueError, match="prefix"):
        write_shards([], tmp_path, "tr.ain", 4)


def test_brace_pattern_expands_to_written_shards(tmp_path, samples):
    paths = write_shards(samples, tmp_path, "val", SHARD_SIZE)
    pattern = brace_pattern(tmp_path, "val", len(paths))
    assert pattern == f"{tmp_path}/val-{{000000..000002}}.tar"
    assert resolve_shards(pattern) == [str(p) for p in paths]


def test_resolve_glob_dir_and_list(shard_dir):
    expected = sorted(str(p) for p in shard_dir.glob("*.tar"))
    assert resolve_shards(str(shard_dir / "train-*.tar")) == expected
    assert resolve_shards(shard_dir) == expected
    listed = resolve_shards([expected[1], str(shard_dir / "train-00000{0,2}.tar")])
    assert listed == [expected[1], expected[0], expected[2]]


def test_resolve_missing_names_the_pattern(tmp_path, shard_dir):
    for spec in [str(tmp_path / "nope-*.tar"), str(tmp_path / "nope-{000000..000003}.tar"), str(tmp_path / "empty")]:
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(FileNotFoundError, match="nope|empty"):
            resolve_shards(spec)
    # A brace pattern that runs past the last shard is an incomplete set, not a subset.
    with pytest.raises(FileNotFoundError, match=r"1 of 4 shards .* missing"):
        resolve_shards(str(shard_dir / "train-{000000..000003}.tar"))
