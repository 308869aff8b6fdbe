"""Training callbacks: reconstruction grids on disk and in wandb, and throughput."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torchvision.utils import save_image

from tokenizers_vis.models.base import batch_pixels
from tokenizers_vis.metrics.grids import reconstruction_grid


class ReconstructionLogger(L.Callback):
    """Every `every_n_steps` (and at the end of training) reconstructs a fixed set of validation
    images with the EMA weights and writes `<run>/reconstructions/step_<7-digit step>.png`; also logs the
    grid to wandb when a WandbLogger is active. Video clips (B, T, 3, H, W) give a frame strip (two rows
    per clip) and also `step_<step>.mp4` (originals above reconstructions), logged to wandb as a video;
    an image tokenizer given clips reconstructs them frame by frame."""

    def __init__(self, every_n_steps: int = 500, num_images: int = 8, dirname: str = "reconstructions"):
        super().__init__()
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.dirname = dirname
        self._images: torch.Tensor | None = None
        self.last_path: Path | None = None

    def _fixed_images(self, trainer: L.Trainer) -> torch.Tensor | None:
        if self._images is None:
            datamodule = trainer.datamodule
            loader = datamodule.val_dataloader() if datamodule is not None else None
            if loader is None:
                return None
            batches, count = [], 0
            for batch in loader:
                batches.append(batch_pixels(batch))
                count += batches[-1].shape[0]
                if count >= self.num_images:
                    break
            if not batches:
                return None
            self._images = torch.cat(batches)[: self.num_images]
        return self._images

    @rank_zero_only
    @torch.no_grad()
    def log_grid(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        images = self._fixed_images(trainer)
        if images is None:
            return
        tokenizer = module.eval_tokenizer
        was_training = tokenizer.training
        tokenizer.eval()
        images = images.to(module.device)
        frame_by_frame = images.dim() == 5 and getattr(tokenizer, "input_kind", "image") == "image"
        inputs = images.flatten(0, 1) if frame_by_frame else images
        reconstructions = tokenizer.decode(tokenizer.encode(inputs)).float().reshape(images.shape)
        tokenizer.train(was_training)
        grid = reconstruction_grid(images, reconstructions)
        step = module.host_step
        out_dir = Path(trainer.default_root_dir) / self.dirname
        out_dir.mkdir(parents=True, exist_ok=True)
        self.last_path = out_dir / f"step_{step:07d}.png"
        save_image(grid, self.last_path)
        fps = getattr(trainer.datamodule, "fps", None) or 8.0  # the clips' rate when the data says it
        video_path = self._write_video(images, reconstructions, out_dir / f"step_{step:07d}.mp4", fps)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image("reconstructions", [grid], step=trainer.global_step)
                if video_path is not None:
                    logger.log_video("reconstructions_video", [str(video_path)], step=trainer.global_step)

    @staticmethod
    def _write_video(images: torch.Tensor, reconstructions: torch.Tensor, path: Path, fps: float) -> Path | None:
        if images.dim() != 5:
            return None
        from tokenizers_vis.data.video import clip_to_frames, write_video

        frames = torch.stack([reconstruction_grid(images[:, t], reconstructions[:, t]) for t in range(images.shape[1])])
        return write_video(path, clip_to_frames(frames), fps=fps)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and module.host_step % self.every_n_steps == 0:
            self.log_grid(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self.log_grid(trainer, module)


class Throughput(L.Callback):
    """Logs images/sec over all devices and per device, averaged over `window` steps."""

    def __init__(self, window: int = 10):
        super().__init__()
        self.window = window
        self._start: float | None = None
        self._images = 0
        self._steps = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._images += batch_pixels(batch).shape[0]
        self._steps += 1
        if self._steps < self.window:
            return
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        elapsed = time.perf_counter() - self._start
        per_device = self._images / max(elapsed, 1e-9)
        module.log_dict({"perf/samples_per_sec": per_device * trainer.world_size,
                         "perf/samples_per_sec_per_device": per_device}, on_step=True, batch_size=1)
        self._start, self._images, self._steps = time.perf_counter(), 0, 0
