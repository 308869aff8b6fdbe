"""Image streams over webdataset shards (or a folder of image files) and their loaders.

Two streams share the decode and collate steps:

- `TrainStream`: infinite. Each (rank, worker) resamples shards from its own share of the
  shard list, shuffles samples in a buffer, and applies resize + random crop + flip, all
  driven by one RNG seeded from (seed, rank, worker, epoch).
- `EvalStream`: finite and deterministic. Samples are split across ranks and workers by
  running index, so every image is seen exactly once whatever the number of shards.

Batches are dicts: {"image": float32 (B, 3, R, R) in [0, 1], "key": list[str],
"label": int64 (B,), -1 where a sample has no class}.

Unreadable samples are skipped, warned about, and counted by a `SkipCounter`.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from itertools import count, islice
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.utils import make_seed

from tokenizers_vis.data.shards import IMAGE_EXTENSIONS, resolve_shards
from tokenizers_vis.data.transforms import decode_image, decode_label, eval_transform, train_transform

IMAGE_FILE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")

# Slots per tally: one per DataLoader worker plus the main process. Workers beyond this
# share slots, which only risks losing an increment in a simultaneous write.
_TALLY_SLOTS = 64


class CorruptSampleWarning(UserWarning):
    """A sample or shard could not be read and was skipped."""


class SkipTally:
    """One loader's skip count, in shared memory so DataLoader workers add to it.

    It is the webdataset error handler of its stream: called with the exception, it
    counts and warns (the first `max_warnings` times per process) and returns True
    ("continue"). Each worker writes its own slot, so counts are exact without locks.
    `max_consecutive` skips without a good sample in between raise instead, so that a
    stream of nothing but bad data fails loudly rather than looping forever.
    """

    def __init__(self, max_warnings: int = 20, max_consecutive: int = 1000):
        self.counts = torch.zeros(_TALLY_SLOTS, dtype=torch.int64).share_memory_()
        self.max_warnings = max_warnings
        self.max_consecutive = max_consecutive
        self._warned = 0
        self._consecutive = 0

    @property
    def skipped(self) -> int:
        return int(self.counts.sum())

    def ok(self) -> None:
        self._consecutive = 0

    def __call__(self, exn: Exception) -> bool:
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (_TALLY_SLOTS - 1)
        self.counts[slot] += 1
        self._consecutive += 1
        if self._consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"{self._consecutive} unreadable samples in a row; giving up (last error: {exn!r})"
            ) from exn
        if self._warned < self.max_warnings:
            self._warned += 1
            suffix = " (further skips are counted, not shown)" if self._warned == self.max_warnings else ""
            warnings.warn(f"skipping unreadable sample: {exn!r}{suffix}", CorruptSampleWarning, stacklevel=2)
        return True


class SkipCounter:
    """Counts samples skipped because they could not be read or decoded.

    Read `counter.skipped` (an int) from the training process at any time: it sums the
    tallies of every loader made with this counter, including what their DataLoader
    workers skipped. It is per process; all-reduce it to get the total over DDP ranks.
    It counts skip events: one per bad sample, and a few for a truncated or unreadable
    shard (the read error, then the partial sample it cut off).
    """

    def __init__(self) -> None:
        self._tallies: list[SkipTally] = []

    def tally(self) -> SkipTally:
        """A new tally for one loader; it is included in `skipped` from now on."""
        tally = SkipTally()
        self._tallies.append(tally)
        return tally

    @property
    def skipped(self) -> int:
        return sum(t.skipped for t in self._tallies)

    def reset(self) -> None:
        for t in self._tallies:
            t.counts.zero_()

    def __repr__(self) -> str:
        return f"SkipCounter(skipped={self.skipped})"


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def image_bytes(sample: dict) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise ValueError(f"no image entry (one of {IMAGE_EXTENSIONS}) among {sorted(sample)}")


def collate(samples: Sequence[dict]) -> dict:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "key": [s["key"] for s in samples],
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
    }


def _describe(sample: dict) -> str:
    return f"{sample.get('__key__')!r} in {sample.get('__url__')}"


def list_image_files(root: str | Path) -> list[Path]:
    """Image files under `root`, recursively, sorted by relative path; hidden ones left out."""
    root = Path(root)
    files = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.suffix.lower() in IMAGE_FILE_SUFFIXES and not any(part.startswith(".") for part in rel.parts):
            if path.is_file():
                files.append((rel.as_posix(), path))
    return [path for _, path in sorted(files)]


def _is_tar_source(source: str | Path | Sequence) -> bool:
    if not isinstance(source, (str, Path)):
        return True
    path = Path(source).expanduser()
    if path.is_dir():
        return any(path.glob("*.tar"))
    return True


class TrainStream(IterableDataset):
    """Infinite stream of training batches (batched inside each worker).

    Shards are split by rank, then by worker, when there are enough of them for each to
    get at least one; otherwise every (rank, worker) resamples from all shards with its
    own seed. Rank and world size are passed in rather than read inside the worker,
    because a spawned worker process has no torch.distributed state.
    `epoch` is advanced by `TrainLoader` on each pass, so a restarted iteration (a new
    Lightning epoch, or a resumed run) draws a fresh stream instead of replaying one.
    """

    def __init__(
        self,
        urls: Sequence[str],
        resolution: int,
        batch_size: int,
        tally: SkipTally,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        random_flip: bool = True,
        interpolation: str = "bicubic",
    ):
        super().__init__()
        self.urls = list(urls)
        self.resolution = resolution
        self.batch_size = batch_size
        self.tally = tally
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.random_flip = random_flip
        self.interpolation = interpolation
        self.epoch = 0

    def own_shards(self, worker: int, num_workers: int) -> list[str]:
        urls = self.urls
        if len(urls) >= self.world_size:
            urls = urls[self.rank :: self.world_size]
        if len(urls) >= num_workers:
            urls = urls[worker::num_workers]
        return urls

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        rng = random.Random(make_seed(self.seed, self.rank, worker, self.epoch))
        urls = self.own_shards(worker, num_workers)
        shards = (dict(url=rng.choice(urls)) for _ in count())
        samples = wds.tarfile_to_samples(handler=self.tally)(shards)
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(samples)
        images = wds.map(lambda s: self._transform(s, rng), handler=self.tally)(samples)
        return wds.batched(self.batch_size, collation_fn=collate, partial=False)(images)

    def _transform(self, sample: dict, rng: random.Random) -> dict:
        try:
            label = decode_label(sample)
            img = decode_image(image_bytes(sample))
        except Exception as exn:
            raise ValueError(f"{_describe(sample)}: {exn}") from exn
        self.tally.ok()
        image = train_transform(img, self.resolution, rng, self.interpolation, self.random_flip)
        return {"image": image, "key": sample["__key__"], "label": label}


class EvalStream(IterableDataset):
    """Finite stream of single samples in a deterministic order.

    The first `max_images` samples (before any split) are dealt out by running index:
    rank r takes i % world_size == r, and within a rank, worker w takes every
    num_workers-th of those. A DataLoader reads its workers round-robin, so the rank's
    samples come out in their original order (when none is skipped; with skips the order
    is still deterministic for a given number of workers). Splitting samples rather than shards
    keeps each image exactly once even with fewer shards than ranks; the cost is that
    every worker reads (but does not decode) the whole tar stream.
    """

    def __init__(
        self,
        source: str | Path | Sequence[str],
        resolution: int,
        tally: SkipTally,
        max_images: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        interpolation: str = "bicubic",
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if _is_tar_source(source):
            self.urls, self.root, self.files = resolve_shards(source), None, None
        else:
            self.root = Path(source).expanduser()
            self.urls, self.files = None, list_image_files(self.root)
            if not self.files:
                raise FileNotFoundError(f"no image files under {str(source)!r}")
        self.resolution = resolution
        self.tally = tally
        self.max_images = max_images
        self.rank = rank
        self.world_size = world_size
        self.interpolation = interpolation

    def _select(self, items: Iterable) -> Iterator:
        worker, num_workers = _worker()
        items = islice(items, self.max_images)
        items = islice(items, self.rank, None, self.world_size)
        return islice(items, worker, None, num_workers)

    def __iter__(self) -> Iterator[dict]:
        if self.files is not None:
            # Select paths first so that a worker only reads the files it keeps.
            samples = wds.map(self._read_file, handler=self.tally)(self._select(self.files))
        else:
            shards = (dict(url=url) for url in self.urls)
            samples = self._select(wds.tarfile_to_samples(handler=self.tally)(shards))
        return wds.map(self._transform, handler=self.tally)(samples)

    def _read_file(self, path: Path) -> dict:
        key = path.relative_to(self.root).with_suffix("").as_posix()
        return {"__key__": key, "__url__": str(path), "image": path.read_bytes()}

    def _transform(self, sample: dict) -> dict:
        try:
            label = decode_label(sample)
            data = sample["image"] if "image" in sample else image_bytes(sample)
            img = decode_image(data)
        except Exception as exn:
            raise ValueError(f"{_describe(sample)}: {exn}") from exn
        self.tally.ok()
        image = eval_transform(img, self.resolution, self.interpolation)
        return {"image": image, "key": sample["__key__"], "label": label}


class TrainLoader(wds.WebLoader):
    """Loader of a `TrainStream` that advances the stream's epoch on every pass.

    Workers are started afresh on each pass (no persistent workers), so they inherit
    the new epoch from this process.
    """

    def __init__(self, stream: TrainStream, num_workers: int, skip_counter: SkipCounter):
        super().__init__(
            stream,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
        )
        self.stream = stream
        self.skip_counter = skip_counter

    def __iter__(self):
        self.stream.epoch += 1
        return super().__iter__()


def make_train_loader(
    shards: str | Sequence[str],
    resolution: int,
    batch_size: int,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    random_flip: bool = True,
    interpolation: str = "bicubic",
    skip_counter: SkipCounter | None = None,
    start_epoch: int = 0,
) -> TrainLoader:
    """Infinite loader of training batches from shards (see `TrainStream`)."""
    skip_counter = skip_counter if skip_counter is not None else SkipCounter()
    stream = TrainStream(
        resolve_shards(shards),
        resolution,
        batch_size,
        skip_counter.tally(),
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        rank=rank,
        world_size=world_size,
        random_flip=random_flip,
        interpolation=interpolation,
    )
    stream.epoch = start_epoch
    return TrainLoader(stream, num_workers, skip_counter)


def make_eval_loader(
    source: str | Path | Sequence[str],
    resolution: int,
    batch_size: int,
    num_workers: int = 0,
    max_images: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    interpolation: str = "bicubic",
    skip_counter: SkipCounter | None = None,
) -> wds.WebLoader:
    """Finite, deterministic loader of centre-cropped batches of any image source.

    `source` is a folder of image files (read recursively, in sorted order), or shards:
    a brace pattern, glob, folder of .tar files, or list. `max_images` caps the total
    before the split across ranks; each image is then seen by exactly one rank. Batches
    are formed in this process from the workers' samples, so each rank gets full batches
    except its last. The returned loader's `skip_counter` counts unreadable samples.
    """
    skip_counter = skip_counter if skip_counter is not None else SkipCounter()
    stream = EvalStream(
        source,
        resolution,
        skip_counter.tally(),
        max_images=max_images,
        rank=rank,
        world_size=world_size,
        interpolation=interpolation,
    )
    loader = wds.WebLoader(stream, batch_size=None, num_workers=num_workers)
    loader = loader.batched(batch_size, collation_fn=collate, partial=True)
    loader.skip_counter = skip_counter
    return loader
