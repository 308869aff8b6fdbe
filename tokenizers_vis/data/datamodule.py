"""The LightningDataModule every training config instantiates (`conf/data/*.yaml`)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch.distributed as dist

from tokenizers_vis.data.pipeline import (
    SkipCounter,
    StreamMark,
    StreamResume,
    TrainLoader,
    make_eval_loader,
    make_train_loader,
)
from tokenizers_vis.data.shards import resolve_shards
from tokenizers_vis.data.transforms import ColorJitter, interpolation_mode


def distributed_rank(trainer: Any = None) -> tuple[int, int]:
    """(rank, world size): from the trainer when attached, else torch.distributed, else (0, 1)."""
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_from_ranks(value: Any) -> list[Any]:
    """`value` of every rank, in rank order (a one-element list outside torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


class TrainPosition:
    """How far training got through the train stream: the pass (`epoch`), the batches it
    consumed, the position each (virtual) worker reached, and the unreadable samples skipped
    within consumed batches over the whole run. Updated from the `StreamMark` of each batch a
    training step takes, so batches the loader prefetched but nobody used do not count."""

    def __init__(self, num_workers: int, epoch: int = 0, skipped: int = 0):
        self.epoch = epoch
        self.consumed = 0
        self.positions = [0] * num_workers
        self.skipped = skipped

    def record(self, mark: StreamMark) -> None:
        if mark.epoch != self.epoch:  # a new pass starts from the top
            self.epoch, self.consumed, self.positions = mark.epoch, 0, [0] * len(self.positions)
        self.consumed += 1
        self.positions[mark.worker] = mark.position
        self.skipped += mark.skipped


class ImageDataModule(L.LightningDataModule):
    """Images from webdataset shards, as {"image", "key", "label"} batches.

    Train: an infinite stream (set the trainer's `max_steps`, and an integer
    `val_check_interval`); resampled shards split by rank and worker, shuffle buffer of
    `shuffle_buffer` samples per worker, short-side resize + random crop + flip, seeded
    from `seed`, rank and worker. Val/test: `val_shards` in a fixed order, short-side
    resize + centre crop, each image on exactly one rank (ranks may differ by one batch,
    so reduce metrics at epoch end, not per step). Both decode in `num_workers` workers.

    `skip_counter.skipped` counts samples dropped as unreadable (this process and its
    workers, including what they read ahead); `skipped_samples()` splits it into train samples
    within the batches training used (exact, and kept across resumes) and eval samples.

    Exact resume: `state_dict()` (saved in every Lightning checkpoint) holds the train
    position of every rank (see `TrainPosition`); a resumed run with the same number of ranks
    and workers continues the stream at the very next batch, skipping the samples already used
    without decoding them. With a different number of ranks or workers it starts a new pass
    (warning). Each rank takes from it its own part, so `state_dict` must be called on every
    rank, as `Trainer.save_checkpoint` does.
    """

    def __init__(
        self,
        train_shards: str | Sequence[str],
        val_shards: str | Sequence[str] | None,
        resolution: int,
        batch_size: int,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        val_max_images: int | None = None,
        random_flip: bool = True,
        interpolation: str = "bicubic",
        crop_scale: Sequence[float] | None = None,
        color_jitter: Mapping[str, float] | None = None,
    ):
        super().__init__()
        interpolation_mode(interpolation)  # fail at construction on a typo, not in a worker
        if crop_scale is not None:
            crop_scale = tuple(float(v) for v in crop_scale)
            if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
                raise ValueError(f"data.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(crop_scale)}")
        self.crop_scale = crop_scale
        if color_jitter is not None:
            unknown = set(color_jitter) - {f.name for f in dataclasses.fields(ColorJitter)}
            if unknown:
                raise ValueError(f"data.color_jitter: unknown keys {sorted(unknown)}; "
                                 "use brightness, contrast, saturation, hue")
            color_jitter = ColorJitter(**color_jitter)
        self.color_jitter = color_jitter
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.resolution = resolution
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.val_max_images = val_max_images
        self.random_flip = random_flip
        self.interpolation = interpolation
        self.skip_counter = SkipCounter()
        self.eval_skip_counter = self.skip_counter.child()
        self.train_urls: list[str] | None = None
        self.val_urls: list[str] | None = None
        self._train_loader: TrainLoader | None = None
        self.position = TrainPosition(max(1, num_workers))
        self._loaded_state: dict[str, Any] | None = None

    def check_sources(self) -> None:
        """Resolve the shard specs now, so a wrong path fails before anything is built."""
        self.setup("fit")

    def setup(self, stage: str | None = None) -> None:
        # Resolve here so a wrong path fails before any worker starts.
        if stage in (None, "fit") and self.train_urls is None:
            self.train_urls = resolve_shards(self.train_shards)
        if self.val_shards is not None and self.val_urls is None:
            self.val_urls = resolve_shards(self.val_shards)

    def _rank(self) -> tuple[int, int]:
        return distributed_rank(self.trainer)

    def train_dataloader(self):
        if self.train_urls is None:
            self.setup("fit")
        rank, world_size = self._rank()
        resume, epoch = self._resume_point(rank, world_size)
        self._train_loader = make_train_loader(
            self.train_urls,
            self.resolution,
            self.batch_size,
            num_workers=self.num_workers,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            random_flip=self.random_flip,
            interpolation=self.interpolation,
            crop_scale=self.crop_scale,
            color_jitter=self.color_jitter,
            skip_counter=self.skip_counter,
            start_epoch=epoch,
        )
        if resume is not None:
            self._train_loader.resume_at(epoch, resume)
        return self._train_loader

    def _resume_point(self, rank: int, world_size: int) -> tuple[StreamResume | None, int]:
        """(where to resume, epoch) from a loaded state: the exact position when this run has the
        same ranks and workers, else None and the epoch after it (a fresh pass)."""
        state, self._loaded_state = self._loaded_state, None
        workers = max(1, self.num_workers)
        if state is None:
            self.position = TrainPosition(workers, self.position.epoch, self.position.skipped)
            return None, self.position.epoch
        epoch = int(state.get("epoch", state.get("train_epoch", 0)))
        skipped = [int(n) for n in state.get("skipped", [])]
        exact = state.get("world_size") == world_size and state.get("num_workers") == workers
        if not exact:
            if "positions" in state:
                warnings.warn(
                    f"the checkpoint's data position is for {state.get('world_size')} rank(s) x "
                    f"{state.get('num_workers')} worker(s), this run has {world_size} x {workers}; "
                    "starting a new pass over the train data instead of resuming it exactly", stacklevel=2)
            self.position = TrainPosition(workers, epoch, sum(skipped) if rank == 0 else 0)
            return None, epoch
        self.position = TrainPosition(workers, epoch, skipped[rank])
        self.position.consumed = int(state["consumed_batches"])
        self.position.positions = [int(p) for p in state["positions"][rank]]
        return StreamResume(self.position.consumed, tuple(self.position.positions)), epoch

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning calls this for each batch a step is about to use: the place to count them.
        if isinstance(batch, dict) and isinstance(batch.get("stream"), StreamMark):
            self.position.record(batch.pop("stream"))
        return batch

    def skipped_samples(self) -> dict[str, int]:
        """Unreadable samples skipped by this rank: train (within consumed batches, whole run) and
        eval (every validation / test pass of this process)."""
        return {"train": self.position.skipped, "eval": self.eval_skip_counter.skipped}

    def _eval_loader(self):
        if self.val_shards is None:
            return []  # Lightning skips validation on an empty list
        if self.val_urls is None:
            self.setup("validate")
        rank, world_size = self._rank()
        return make_eval_loader(
            self.val_urls,
            self.resolution,
            self.val_batch_size,
            num_workers=self.num_workers,
            max_images=self.val_max_images,
            rank=rank,
            world_size=world_size,
            interpolation=self.interpolation,
            skip_counter=self.eval_skip_counter,
        )

    def val_dataloader(self):
        return self._eval_loader()

    def test_dataloader(self):
        return self._eval_loader()

    def state_dict(self) -> dict[str, Any]:
        if self._loaded_state is not None:  # saved again before training resumed: keep it as loaded
            return dict(self._loaded_state)
        _, world_size = self._rank()
        position = self.position
        ranks = gather_from_ranks((position.positions, position.skipped))
        return {
            "epoch": position.epoch,
            "consumed_batches": position.consumed,
            "num_workers": len(position.positions),
            "world_size": world_size,
            "positions": [p for p, _ in ranks],
            "skipped": [n for _, n in ranks],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_state = dict(state_dict)


class DemoShardsMixin:
    """The part the image and video demo modules share (listed first among the bases): shards in
    `demo_dir`, built there on first use (rank 0, before any process reads them) by the
    `_ensure_demo_shards()` each demo module defines."""

    def __init__(self, demo_dir: str, **kwargs: Any):
        self.demo_dir = demo_dir
        kwargs.setdefault("train_shards", f"{demo_dir}/train-*.tar")
        kwargs.setdefault("val_shards", f"{demo_dir}/val-*.tar")
        super().__init__(**kwargs)

    def check_sources(self) -> None:
        """Nothing to check early: `prepare_data` builds whatever demo shards are missing."""

    def prepare_data(self) -> None:
        if not self._demo_shards_ready():
            self._ensure_demo_shards()

    def _demo_shards_ready(self) -> bool:
        """Shards are there (a set built with other arguments, e.g. a smaller one for tests, is kept)."""
        try:
            resolve_shards(self.train_shards)
            resolve_shards(self.val_shards)
        except FileNotFoundError:
            return False
        return True


class DemoDataModule(DemoShardsMixin, ImageDataModule):
    """`ImageDataModule` over the demo shards in `demo_dir`, built there on first use (rank 0,
    before any process reads them), so `python train.py experiment=demo` works on a fresh clone."""

    def _ensure_demo_shards(self) -> None:
        from tokenizers_vis.data.demo import ensure_demo_shards

        ensure_demo_shards(self.demo_dir)

    def _demo_shards_ready(self) -> bool:
        # A set of an older layout (e.g. validation crops of the training photos) is rebuilt.
        from tokenizers_vis.data.demo import is_outdated_demo_set

        return super()._demo_shards_ready() and not is_outdated_demo_set(self.demo_dir)
