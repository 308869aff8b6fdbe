"""Image streams over webdataset shards (or a folder of image files) and their loaders.

Two streams share the decode and collate steps:

- `TrainStream`: infinite. Each (rank, worker) resamples shards from its own share of the
  data, shuffles samples in a buffer and applies resize + random crop + flip. The sample order
  is a pure function of (seed, rank, worker, epoch) and each sample's augmentation of its
  position in that order, so a stream can be resumed exactly from a count of samples
  without decoding what it skips.
- `EvalStream`: finite and deterministic. Samples are split across ranks and workers by
  running index, so every image is seen exactly once whatever the number of shards.

Batches are dicts: {"image": float32 (B, 3, R, R) in [0, 1], "key": list[str],
"label": int64 (B,), -1 where a sample has no class}, plus "text": list[str] when every sample
of the batch has a caption ("txt"); train batches also carry "stream": a `StreamMark` saying
where in the stream they end.

Unreadable samples are skipped, warned about, and counted by a `SkipCounter`.
"""

from __future__ import annotations

import atexit
import os
import random
import signal
import warnings
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from tokenizers_vis.data.shards import IMAGE_EXTENSIONS, resolve_shards
from tokenizers_vis.data.transforms import (
    ColorJitter,
    decode_image,
    decode_label,
    decode_text,
    eval_transform,
    train_transform,
)

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

    @staticmethod
    def _slot() -> int:
        info = get_worker_info()
        return 0 if info is None else 1 + info.id % (_TALLY_SLOTS - 1)

    def local_count(self) -> int:
        """What this process (this worker) has counted so far."""
        return int(self.counts[self._slot()])

    def __call__(self, exn: Exception) -> bool:
        self.counts[self._slot()] += 1
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
        self._children: list[SkipCounter] = []

    def tally(self) -> SkipTally:
        """A new tally for one loader; it is included in `skipped` from now on."""
        tally = SkipTally()
        self._tallies.append(tally)
        return tally

    def child(self) -> SkipCounter:
        """A counter of its own (e.g. for the eval loaders) whose skips also count here."""
        child = SkipCounter()
        self._children.append(child)
        return child

    @property
    def skipped(self) -> int:
        return sum(t.skipped for t in self._tallies) + sum(c.skipped for c in self._children)

    def reset(self) -> None:
        for t in self._tallies:
            t.counts.zero_()
        for c in self._children:
            c.reset()

    def __repr__(self) -> str:
        return f"SkipCounter(skipped={self.skipped})"


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


_main_exiting: torch.Tensor | None = None


def _main_exiting_flag() -> torch.Tensor:
    """A flag in shared memory that this process sets when its interpreter exits."""
    global _main_exiting
    if _main_exiting is None:
        # Not an inference tensor even when the first loader is built under inference_mode
        # (validation): the exit hook updates it in place outside that mode.
        with torch.inference_mode(False):
            _main_exiting = torch.zeros(1, dtype=torch.uint8).share_memory_()
        # Registered after multiprocessing's own exit hook, so it runs before that hook
        # terminates (SIGTERM) and joins the daemon worker processes.
        atexit.register(_main_exiting.fill_, 1)
    return _main_exiting


class PreemptionShield:
    """DataLoader `worker_init_fn` that makes workers outlive a cluster's SIGTERM / SIGUSR1.

    A cluster signals every process of a job; the main process then checkpoints and stops,
    shutting its workers down itself, but a worker killed first would crash it mid-step. So a
    worker ignores these signals, except once its main process is exiting (then SIGTERM is
    how multiprocessing stops leftover workers) or gone (PyTorch's watchdog ends it).
    """

    def __init__(self) -> None:
        self.main_exiting = _main_exiting_flag()

    def __call__(self, worker_id: int) -> None:
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.main_exiting[0]:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


class StreamMark(NamedTuple):
    """Where a train batch ends in its worker's stream: `position` samples of virtual worker
    `worker`'s order (pass `epoch`) have been used, `skipped` of them since the previous
    batch were unreadable. Recording the mark of every consumed batch is enough to resume.
    (A NamedTuple passes unchanged through DataLoader and Lightning batch conversions.)"""

    epoch: int
    worker: int
    position: int
    skipped: int


class StreamResume(NamedTuple):
    """Where a pass resumes: `consumed` batches were used, `positions[v]` samples of virtual
    worker v's order. DataLoader workers are read round-robin, so after `consumed` batches the
    next one comes from virtual worker `consumed % num_workers`: physical worker w plays
    virtual worker (w + consumed) % num_workers."""

    consumed: int
    positions: tuple[int, ...]


def image_bytes(sample: dict) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise ValueError(f"no image entry (one of {IMAGE_EXTENSIONS}) among {sorted(sample)}")


def collate(samples: Sequence[dict]) -> dict:
    batch = {
        "image": torch.stack([s["image"] for s in samples]),
        "key": [s["key"] for s in samples],
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
    }
    texts = [s.get("text") for s in samples]
    if all(text is not None for text in texts):  # captions ("txt"): image + text batches
        batch["text"] = texts
    return batch


def _describe(sample: dict) -> str:
    return f"{sample.get('__key__')!r} in {sample.get('__url__')}"


def list_image_files(root: str | Path, suffixes: Sequence[str] = IMAGE_FILE_SUFFIXES) -> list[Path]:
    """Image files under `root`, recursively, sorted by relative path; hidden ones left out.
    `suffixes` (lower case) lets video.py list its files with the same walk."""
    root = Path(root)
    files = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.suffix.lower() in suffixes and not any(part.startswith(".") for part in rel.parts):
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
    get one; otherwise the samples of each shard are dealt out by index (see `own_share`), so
    ranks never share a sample. Rank and world size are passed in rather than read inside the
    worker, because a spawned worker process has no torch.distributed state.

    Worker v's sample order (shard draws + shuffle buffer) comes from one RNG seeded by
    (seed, rank, v, epoch); sample i of that order is augmented with an RNG seeded by
    (seed, rank, v, epoch, i). Resuming at a position therefore reads and drops the samples
    before it without decoding them. `epoch` is advanced by `TrainLoader` on each new pass.
    """

    collate = staticmethod(collate)  # samples -> batch; the video stream stacks clips instead

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
        crop_scale: tuple[float, float] | None = None,
        color_jitter: ColorJitter | None = None,
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
        self.crop_scale = crop_scale
        self.color_jitter = color_jitter
        self.epoch = 0
        self.resume: StreamResume | None = None

    def own_share(self, worker: int, num_workers: int) -> tuple[list[str], int, int]:
        """(shards, slot, slots): this (rank, worker) draws from `shards` and keeps the samples
        whose index within a shard is `slot` modulo `slots`. Shards go to ranks, then workers,
        while there are enough of them; below that, samples are dealt out instead."""
        urls, slot, slots = self.urls, 0, 1
        if len(urls) >= self.world_size:
            urls = urls[self.rank :: self.world_size]
        else:
            slot, slots = self.rank, self.world_size
        if len(urls) >= num_workers:
            urls = urls[worker::num_workers]
        else:
            slot, slots = slot * num_workers + worker, slots * num_workers
        return urls, slot, slots

    def _rng(self, *parts: int) -> random.Random:
        # String seeds are hashed with SHA-512: stable across processes, no collisions in practice.
        return random.Random("/".join(str(p) for p in (self.seed, self.rank, *parts)))

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        resume = self.resume
        if resume is not None and len(resume.positions) != num_workers:
            raise ValueError(f"resume positions for {len(resume.positions)} workers, loader has {num_workers}")
        virtual = (worker + (resume.consumed if resume else 0)) % num_workers
        start = resume.positions[virtual] if resume else 0
        return self._batches(virtual, num_workers, self.epoch, start)

    def _samples(self, urls: list[str], slot: int, slots: int, rng: random.Random) -> Iterator[dict]:
        empty_reads = 0
        while True:
            shard = wds.tarfile_to_samples(handler=self.tally)([dict(url=rng.choice(urls))])
            for sample in islice(shard, slot, None, slots):
                empty_reads = 0
                yield sample
            empty_reads += 1
            if empty_reads > 100 + 10 * len(urls):  # e.g. fewer samples per shard than ranks x workers
                raise RuntimeError(f"no samples for slot {slot} of {slots} in {len(urls)} shard(s) ({urls[0]}, ...)")

    def _batches(self, virtual: int, num_workers: int, epoch: int, start: int) -> Iterator[dict]:
        urls, slot, slots = self.own_share(virtual, num_workers)
        order = self._rng(virtual, epoch)
        samples = self._samples(urls, slot, slots, order)
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=order)(samples)
        samples = iter(samples)
        for _ in range(start):  # fast-forward: read, never decode
            next(samples)
        skipped_before = self.tally.local_count()
        batch: list[dict] = []
        for position, sample in enumerate(samples, start=start):
            try:
                batch.append(self._transform(sample, self._rng(virtual, epoch, position)))
            except Exception as exn:  # unreadable: count, warn, go on (the tally raises after too many)
                self.tally(exn)
                continue
            if len(batch) == self.batch_size:
                skipped = self.tally.local_count()
                out = self.collate(batch)
                out["stream"] = StreamMark(epoch, virtual, position + 1, skipped - skipped_before)
                yield out
                batch, skipped_before = [], skipped

    def _transform(self, sample: dict, rng: random.Random) -> dict:
        try:
            label = decode_label(sample)
            img = decode_image(image_bytes(sample))
        except Exception as exn:
            raise ValueError(f"{_describe(sample)}: {exn}") from exn
        self.tally.ok()
        image = train_transform(img, self.resolution, rng, self.interpolation, self.random_flip, self.crop_scale,
                                self.color_jitter)
        return {"image": image, "key": sample["__key__"], "label": label, "text": decode_text(sample)}


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
            self.urls, self.files = None, self._list_files(self.root)
            if not self.files:
                raise FileNotFoundError(f"no {self._FILES} under {str(source)!r}")
        self.resolution = resolution
        self.tally = tally
        self.max_images = max_images
        self.rank = rank
        self.world_size = world_size
        self.interpolation = interpolation

    # What a folder source holds (VideoEvalStream lists video files instead).
    _FILES = "image files"

    def _list_files(self, root: Path) -> list[Path]:
        return list_image_files(root)

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
        return {"image": image, "key": sample["__key__"], "label": label, "text": decode_text(sample)}


class TrainLoader(wds.WebLoader):
    """Loader of a `TrainStream` that advances the stream's epoch on every pass.

    Workers are started afresh on each pass (no persistent workers), so they inherit
    the new epoch from this process. `resume_at` makes the next pass continue a pass of an
    earlier run instead. Workers outlive a cluster's SIGTERM / SIGUSR1 (see `PreemptionShield`).
    """

    def __init__(self, stream: TrainStream, num_workers: int, skip_counter: SkipCounter):
        super().__init__(
            stream,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=PreemptionShield() if num_workers > 0 else None,
        )
        self.stream = stream
        self.skip_counter = skip_counter
        # Workers that each produce their own sample order (without workers, this process).
        self.stream_workers = max(1, num_workers)
        self._resume: StreamResume | None = None

    def resume_at(self, epoch: int, resume: StreamResume) -> None:
        if len(resume.positions) != self.stream_workers:
            raise ValueError(f"resume positions for {len(resume.positions)} workers, loader has {self.stream_workers}")
        self.stream.epoch = epoch
        self._resume = resume

    def __iter__(self):
        # Lazy: Lightning calls iter() once just to check the loader is iterable; only a pass
        # that is actually read may use up a resume point or start workers.
        if self._resume is not None:
            self.stream.resume, self._resume = self._resume, None
        else:
            self.stream.epoch += 1
            self.stream.resume = None
        yield from super().__iter__()


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
    crop_scale: tuple[float, float] | None = None,
    color_jitter: ColorJitter | None = None,
) -> TrainLoader:
    """Infinite loader of training batches from shards (see `TrainStream`); its first pass
    uses epoch `start_epoch + 1` (see `TrainLoader.resume_at` to continue a pass instead)."""
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
        crop_scale=crop_scale,
        color_jitter=color_jitter,
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
    loader = wds.WebLoader(
        stream, batch_size=None, num_workers=num_workers,
        worker_init_fn=PreemptionShield() if num_workers > 0 else None,
    )
    loader = loader.batched(batch_size, collation_fn=collate, partial=True)
    loader.skip_counter = skip_counter
    return loader
