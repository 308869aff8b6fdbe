import pytest
import torch

from tokenizers_vis.data import CorruptSampleWarning, SkipCounter, make_eval_loader, make_train_loader, write_shards
from tokenizers_vis.data.pipeline import SkipTally, StreamResume, TrainStream

from .conftest import NUM_IMAGES, SHARD_SIZE, make_samples, random_image

RES = 16


def collect(loader):
    keys, images, labels = [], [], []
    for batch in loader:
        keys += batch["key"]
        images.append(batch["image"])
        labels.append(batch["label"])
    return keys, torch.cat(images), torch.cat(labels)


def test_eval_batches_shapes_dtype_range_and_labels(shard_dir):
    batches = list(make_eval_loader(str(shard_dir / "train-*.tar"), RES, batch_size=5))
    assert [len(b["key"]) for b in batches] == [5, 5, 2]
    for b in batches:
        assert b["image"].shape == (len(b["key"]), 3, RES, RES)
        assert b["image"].dtype == torch.float32
        assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0 and b["image"].std() > 0.1
        assert b["label"].dtype == torch.long
    keys, images, labels = collect(batches)
    assert keys == [f"img{i:03d}" for i in range(NUM_IMAGES)]
    assert labels.tolist() == [i // 2 if i % 2 == 0 else -1 for i in range(NUM_IMAGES)]
    # The grayscale sample (img003) comes out as three equal channels.
    assert torch.equal(images[3, 0], images[3, 1]) and torch.equal(images[3, 0], images[3, 2])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_two_ranks_see_each_image_once_and_match_one_rank(shard_dir, num_workers):
    source = str(shard_dir)
    keys1, images1, _ = collect(make_eval_loader(source, RES, 4, num_workers=num_workers))
    assert keys1 == [f"img{i:03d}" for i in range(NUM_IMAGES)]
    per_rank = [
        collect(make_eval_loader(source, RES, 4, num_workers=num_workers, rank=r, world_size=2)) for r in range(2)
    ]
    assert per_rank[0][0] == keys1[0::2] and per_rank[1][0] == keys1[1::2]
    assert sorted(per_rank[0][0] + per_rank[1][0]) == keys1
    for r, (keys, images, _) in enumerate(per_rank):
        assert torch.equal(images, images1[r::2])


def test_eval_single_shard_split_by_sample_and_max_images(tmp_path, samples):
    write_shards(samples, tmp_path, "val", shard_size=100)
    assert len(list(tmp_path.glob("val-*.tar"))) == 1
    source = str(tmp_path / "val-{000000..000000}.tar")
    ranks = [collect(make_eval_loader(source, RES, 3, max_images=7, rank=r, world_size=3))[0] for r in range(3)]
    assert [len(k) for k in ranks] == [3, 2, 2]
    assert sorted(sum(ranks, [])) == [f"img{i:03d}" for i in range(7)]
    assert len(collect(make_eval_loader(source, RES, 3, max_images=5))[0]) == 5


def test_eval_from_image_folder(tmp_path, samples):
    import numpy as np

    rng = np.random.default_rng(1)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ["b.png", "a.jpg", "sub/c.png", "sub/.hidden.png"]:
        random_image(rng).save(tmp_path / "imgs" / name)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    keys, images, labels = collect(make_eval_loader(tmp_path / "imgs", RES, 2))
    assert keys == ["a", "b", "sub/c"]
    assert images.shape == (3, 3, RES, RES) and labels.tolist() == [-1, -1, -1]
    rank1 = collect(make_eval_loader(str(tmp_path / "imgs"), RES, 2, rank=1, world_size=2))
    assert rank1[0] == ["b"] and torch.equal(rank1[1][0], images[1])


def test_corrupt_sample_is_skipped_counted_and_warned(tmp_path):
    samples = make_samples()
    samples.insert(3, {"__key__": "garbage", "png": b"definitely not a png", "cls": 1})
    write_shards(samples, tmp_path, "train", SHARD_SIZE)
    loader = make_eval_loader(str(tmp_path), RES, 4)
    with pytest.warns(CorruptSampleWarning, match="garbage"):
        keys, _, _ = collect(loader)
    assert keys == [f"img{i:03d}" for i in range(NUM_IMAGES)]
    assert loader.skip_counter.skipped == 1


@pytest.mark.filterwarnings("ignore::tokenizers_vis.data.pipeline.CorruptSampleWarning")
def test_truncated_tar_is_skipped_and_counted(shard_dir):
    shard = shard_dir / "train-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    counter = SkipCounter()
    keys, _, _ = collect(make_eval_loader(str(shard_dir), RES, 4, skip_counter=counter))
    assert keys[:5] == [f"img{i:03d}" for i in range(5)] and keys[-2:] == ["img010", "img011"]
    assert 7 <= len(keys) < NUM_IMAGES
    assert counter.skipped >= 1
    # Training keeps going over the broken shard, in worker processes too.
    train = make_train_loader(str(shard_dir), RES, 4, num_workers=2, shuffle_buffer=4, skip_counter=counter)
    before = counter.skipped
    it = iter(train)
    batches = [next(it) for _ in range(8)]
    assert all(b["image"].shape == (4, 3, RES, RES) for b in batches)
    assert counter.skipped > before  # counted by the worker processes, read here


def test_stream_of_only_garbage_fails_loudly(tmp_path):
    write_shards([{"__key__": f"g{i}", "png": b"junk"} for i in range(3)], tmp_path, "train", 2)
    stream = TrainStream([str(p) for p in sorted(tmp_path.glob("*.tar"))], RES, 2, SkipTally(max_consecutive=10))
    with pytest.warns(CorruptSampleWarning), pytest.raises(RuntimeError, match="in a row"):
        next(iter(stream))


def test_train_batches_shapes_and_reproducible_seeding(shard_dir):
    def first_batches(seed, n=4):
        it = iter(make_train_loader(str(shard_dir), RES, 4, num_workers=0, shuffle_buffer=8, seed=seed))
        return [next(it) for _ in range(n)]

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    for batch in a:
        assert batch["image"].shape == (4, 3, RES, RES) and batch["image"].dtype == torch.float32
        assert batch["label"].shape == (4,) and len(batch["key"]) == 4
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert all(x["key"] == y["key"] and torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert any(x["key"] != y["key"] or not torch.equal(x["image"], y["image"]) for x, y in zip(a, c))


def test_train_new_pass_draws_a_new_stream(shard_dir):
    loader = make_train_loader(str(shard_dir), RES, 6, num_workers=0, shuffle_buffer=8)
    first = [next(iter(loader)) for _ in range(2)]
    assert first[0]["key"] != first[1]["key"] or not torch.equal(first[0]["image"], first[1]["image"])
    assert loader.stream.epoch == 2


def test_train_with_workers_yields_distinct_worker_streams(shard_dir):
    loader = make_train_loader(str(shard_dir), RES, 4, num_workers=2, shuffle_buffer=8, seed=3)
    it = iter(loader)
    batches = [next(it) for _ in range(6)]
    assert all(b["image"].shape == (4, 3, RES, RES) for b in batches)
    # The DataLoader alternates workers; each worker reads its own shards and seed.
    assert batches[0]["key"] != batches[1]["key"]
    again = iter(make_train_loader(str(shard_dir), RES, 4, num_workers=2, shuffle_buffer=8, seed=3))
    assert [next(again)["key"] for _ in range(6)] == [b["key"] for b in batches]


def test_train_shards_split_by_rank_then_worker():
    urls = [f"s{i}.tar" for i in range(8)]
    tally = SkipTally()
    streams = [TrainStream(urls, RES, 2, tally, rank=r, world_size=2) for r in range(2)]
    shares = [stream.own_share(w, 2) for stream in streams for w in range(2)]
    assert sorted(sum((s for s, _, _ in shares), [])) == sorted(urls) and all(len(s) == 2 for s, _, _ in shares)
    assert all((slot, slots) == (0, 1) for _, slot, slots in shares)
    # Too few shards for every rank: each reads all of them and keeps every other sample.
    assert TrainStream(urls[:1], RES, 2, tally, rank=1, world_size=2).own_share(1, 2) == (urls[:1], 3, 4)
    # Enough for the ranks, not for the workers: shards by rank, samples by worker.
    assert TrainStream(urls[:3], RES, 2, tally, rank=1, world_size=2).own_share(1, 2) == (["s1.tar"], 1, 2)


@pytest.mark.parametrize("num_shards", [1, 3])
def test_ranks_never_share_a_train_sample(tmp_path, num_shards):
    write_shards(make_samples(), tmp_path, "train", -(-NUM_IMAGES // num_shards))
    urls = sorted(str(p) for p in tmp_path.glob("train-*.tar"))
    assert len(urls) == num_shards
    seen = []
    for rank in range(2):
        it = iter(TrainStream(urls, RES, 2, SkipTally(), shuffle_buffer=4, rank=rank, world_size=2))
        seen.append({key for _ in range(12) for key in next(it)["key"]})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] <= {f"img{i:03d}" for i in range(NUM_IMAGES)}


@pytest.mark.filterwarnings("ignore::tokenizers_vis.data.pipeline.CorruptSampleWarning")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_stream_resumes_exactly_from_its_marks(tmp_path, num_workers):
    samples = make_samples()
    samples.insert(4, {"__key__": "garbage", "png": b"junk"})
    write_shards(samples, tmp_path, "train", SHARD_SIZE)
    shard = tmp_path / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:-700])  # a truncated last shard

    def loader():
        return make_train_loader(str(tmp_path), RES, 3, num_workers=num_workers, shuffle_buffer=4, seed=1)

    it = iter(loader())
    batches = [next(it) for _ in range(10)]
    marks = [b["stream"] for b in batches]
    assert sum(m.skipped for m in marks) >= 1  # the garbage and the cut-off end, within these batches
    consumed = 5
    positions = [0] * max(1, num_workers)
    for mark in marks[:consumed]:
        positions[mark.worker] = mark.position
    resumed = loader()
    resumed.resume_at(marks[0].epoch, StreamResume(consumed, tuple(positions)))
    again = iter(resumed)
    for batch in batches[consumed:]:
        other = next(again)
        assert other["key"] == batch["key"] and torch.equal(other["image"], batch["image"])
        assert other["stream"] == batch["stream"]


def test_exit_flag_made_under_inference_mode_can_be_set_at_exit(monkeypatch):
    """The flag's exit hook (`fill_(1)`) runs outside inference mode; a flag first made while
    validating (under inference_mode) must still accept it (it printed "Inplace update to
    inference tensor" at every training exit)."""
    from tokenizers_vis.data import pipeline

    hooks = []
    monkeypatch.setattr(pipeline, "_main_exiting", None)
    monkeypatch.setattr(pipeline.atexit, "register", lambda fn, *args: hooks.append((fn, args)))
    with torch.inference_mode():
        flag = pipeline.PreemptionShield().main_exiting
    assert not flag.is_inference() and flag.is_shared()
    for fn, args in hooks:
        fn(*args)
    assert flag[0] == 1
