"""The video LightningDataModules (`conf/data/demo_video.yaml`, `conf/data/webdataset_video.yaml`)."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers_vis.data.datamodule import DemoShardsMixin, ImageDataModule
from tokenizers_vis.data.video import make_video_eval_loader, make_video_train_loader


class VideoDataModule(ImageDataModule):
    """Video clips from webdataset shards, as {"video" (B, T, 3, R, R), "key", "text"} batches.

    Everything `ImageDataModule` promises holds (split by rank and worker, exact resume, each val
    video on one rank, skip counts); each sample is a clip of `frames` frames at `fps` (resampled
    from the video's own rate; null: its own rate): a random clip with one random crop / flip in
    training, the first clip centre-cropped in validation. `val_max_videos` caps the val videos.
    """

    def __init__(
        self,
        train_shards: str | Sequence[str],
        val_shards: str | Sequence[str] | None,
        resolution: int,
        batch_size: int,
        frames: int = 16,
        fps: float | None = 8.0,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        shuffle_buffer: int = 100,
        seed: int = 0,
        val_max_videos: int | None = None,
        random_flip: bool = True,
        interpolation: str = "bicubic",
        crop_scale: Sequence[float] | None = None,
    ):
        if frames < 1:
            raise ValueError(f"data.frames must be >= 1, got {frames}")
        if fps is not None and fps <= 0:
            raise ValueError(f"data.fps must be > 0 or null (the video's own rate), got {fps}")
        super().__init__(train_shards, val_shards, resolution, batch_size, val_batch_size=val_batch_size,
                         num_workers=num_workers, shuffle_buffer=shuffle_buffer, seed=seed,
                         val_max_images=val_max_videos, random_flip=random_flip, interpolation=interpolation,
                         crop_scale=crop_scale)
        self.frames = frames
        self.fps = None if fps is None else float(fps)

    def train_dataloader(self):
        if self.train_urls is None:
            self.setup("fit")
        rank, world_size = self._rank()
        resume, epoch = self._resume_point(rank, world_size)
        self._train_loader = make_video_train_loader(
            self.train_urls, self.resolution, self.batch_size, frames=self.frames, fps=self.fps,
            num_workers=self.num_workers, shuffle_buffer=self.shuffle_buffer, seed=self.seed, rank=rank,
            world_size=world_size, random_flip=self.random_flip, interpolation=self.interpolation,
            crop_scale=self.crop_scale, skip_counter=self.skip_counter, start_epoch=epoch,
        )
        if resume is not None:
            self._train_loader.resume_at(epoch, resume)
        return self._train_loader

    def _eval_loader(self):
        if self.val_shards is None:
            return []
        if self.val_urls is None:
            self.setup("validate")
        rank, world_size = self._rank()
        return make_video_eval_loader(
            self.val_urls, self.resolution, self.val_batch_size, frames=self.frames, fps=self.fps,
            num_workers=self.num_workers, max_videos=self.val_max_images, rank=rank, world_size=world_size,
            interpolation=self.interpolation, skip_counter=self.eval_skip_counter,
        )


class DemoVideoDataModule(DemoShardsMixin, VideoDataModule):
    """`VideoDataModule` over the demo video shards in `demo_dir` (pans and zooms over the demo
    photos), built there on first use, so `data=demo_video` works on a fresh clone."""

    def _ensure_demo_shards(self) -> None:
        from tokenizers_vis.data.demo_video import ensure_demo_video_shards

        ensure_demo_video_shards(self.demo_dir)
