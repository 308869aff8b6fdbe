"""The LightningDataModule every training config instantiates (`conf/data/*.yaml`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch.distributed as dist

from tokenizers_vis.data.pipeline import SkipCounter, make_eval_loader, make_train_loader
from tokenizers_vis.data.shards import resolve_shards
from tokenizers_vis.data.transforms import interpolation_mode


def distributed_rank(trainer: Any = None) -> tuple[int, int]:
    """(rank, world size): from the trainer when attached, else torch.distributed, else (0, 1)."""
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ImageDataModule(L.LightningDataModule):
    """Images from webdataset shards, as {"image", "key", "label"} batches.

    Train: an infinite stream (set the trainer's `max_steps`, and an integer
    `val_check_interval`); resampled shards split by rank and worker, shuffle buffer of
    `shuffle_buffer` samples per worker, short-side resize + random crop + flip, seeded
    from `seed`, rank and worker. Val/test: `val_shards` in a fixed order, short-side
    resize + centre crop, each image on exactly one rank (ranks may differ by one batch,
    so reduce metrics at epoch end, not per step). Both decode in `num_workers` workers.

    `skip_counter.skipped` counts samples dropped as unreadable (this process and its
    workers). Its state_dict records the train epoch so a resumed run draws a fresh
    stream rather than replaying the first one.
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
    ):
        super().__init__()
        interpolation_mode(interpolation)  # fail at construction on a typo, not in a worker
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
        self.train_urls: list[str] | None = None
        self.val_urls: list[str] | None = None
        self._train_loader = None
        self._resume_epoch = 0

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
            skip_counter=self.skip_counter,
            start_epoch=self._resume_epoch,
        )
        return self._train_loader

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
            skip_counter=self.skip_counter,
        )

    def val_dataloader(self):
        return self._eval_loader()

    def test_dataloader(self):
        return self._eval_loader()

    def state_dict(self) -> dict[str, Any]:
        epoch = self._train_loader.stream.epoch if self._train_loader is not None else self._resume_epoch
        return {"train_epoch": epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_epoch = int(state_dict.get("train_epoch", 0))


class DemoDataModule(ImageDataModule):
    """`ImageDataModule` over the demo shards in `demo_dir`, built there on first use (rank 0,
    before any process reads them), so `python train.py experiment=demo` works on a fresh clone."""

    def __init__(self, demo_dir: str, **kwargs: Any):
        self.demo_dir = demo_dir
        kwargs.setdefault("train_shards", f"{demo_dir}/train-*.tar")
        kwargs.setdefault("val_shards", f"{demo_dir}/val-*.tar")
        super().__init__(**kwargs)

    def prepare_data(self) -> None:
        try:
            resolve_shards(self.train_shards)
            resolve_shards(self.val_shards)
        except FileNotFoundError:
            from tokenizers_vis.data.demo import ensure_demo_shards

            ensure_demo_shards(self.demo_dir)
