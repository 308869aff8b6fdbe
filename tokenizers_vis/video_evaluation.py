"""Reconstruction evaluation on video: clips in, per-frame PSNR/SSIM/LPIPS, rFID over frames, rFVD
(I3D), a temporal-consistency error and per-video lists out, written as `metrics.json`, plus
`grid.mp4` (each frame: originals above reconstructions) and `frames.png` (two rows per clip:
its frames, then their reconstructions).

A video tokenizer (`input_kind == "video"`) encodes whole clips; an image tokenizer is applied
frame by frame, so image and video tokenizers are measured on the very same clips.

- `evaluate_video_reconstruction(tokenizer, loader, metrics)`: the loop (any
  `VideoReconstructionMetrics`; tests inject small feature networks).
- `run_video_evaluation(cfg)`: the body of `eval/reconstruct.py` for video data (`is_video_config`):
  the same processes, sharding, weights handling and files as `run_evaluation`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tokenizers_vis.evaluation import (
    METRICS_FILE,
    PSNR_SSIM_SETTINGS,
    _autocast,
    _autocast_dtype,
    _compose_data_preset,
    _module_device,
    _rank,
    expected_images,
    json_ready,
    metrics_factory_from_cfg,
    resolve_data_source,
    setup_processes,
    token_counts,
)
from tokenizers_vis.metrics import (
    I3D_WEIGHTS_FILE,
    MissingWeightsError,
    StreamingFVD,
    VideoReconstructionMetrics,
    quantize,
)
from tokenizers_vis.metrics.distributed import all_reduce_sum
from tokenizers_vis.metrics.fvd import I3D_MIN_FRAMES

__all__ = [
    "FRAME_STRIP_FILE",
    "VIDEO_GRID_FILE",
    "evaluate_video_reconstruction",
    "is_video_config",
    "reconstruct_clips",
    "run_video_evaluation",
    "video_clip_settings",
    "write_video_grid",
]

log = logging.getLogger(__name__)

VIDEO_GRID_FILE = "grid.mp4"
FRAME_STRIP_FILE = "frames.png"
DEFAULT_FRAMES = 16
TEMPORAL_ERROR_SETTINGS = (
    "mean over consecutive frames, channels and pixels of |(x[t+1] - x[t]) - (y[t+1] - y[t])| on [0, 1] "
    "(both clips rounded to uint8), per video, then averaged over videos; 0: the reconstruction changes from "
    "frame to frame exactly as the original"
)


# -- the loop -----------------------------------------------------------------------------------
def reconstruct_clips(tokenizer: nn.Module, video: Tensor) -> tuple[Tensor, Tensor | None]:
    """(reconstruction (B, T, 3, H, W), token ids) of clips: whole clips for a video tokenizer,
    frame by frame (ids (B * T, ...)) for an image tokenizer."""
    if getattr(tokenizer, "input_kind", "image") == "video":
        encoded = tokenizer.encode(video)
        return tokenizer.decode(encoded), encoded.ids
    encoded = tokenizer.encode(video.flatten(0, 1))
    return tokenizer.decode(encoded).reshape(video.shape), encoded.ids


@torch.no_grad()
def evaluate_video_reconstruction(
    tokenizer: nn.Module,
    loader: Iterable,
    metrics: VideoReconstructionMetrics,
    *,
    device: torch.device | str | None = None,
    precision: str = "32",
    grid_path: str | os.PathLike | None = None,
    strip_path: str | os.PathLike | None = None,
    grid_videos: int = 4,
    grid_fps: float = 8.0,
    progress: bool = True,
    total: int | None = None,
) -> dict[str, Any]:
    """Reconstruct every clip of `loader` ({"video": (B, T, 3, H, W), "key"} batches, or bare
    tensors) and measure it; returns `metrics.compute()` over all ranks (every rank must call
    this). Rank 0 writes its first `grid_videos` clips to `grid_path` (mp4 at `grid_fps`) and
    `strip_path` (PNG)."""
    device = torch.device(device) if device is not None else _module_device(tokenizer)
    metrics.to(device)
    autocast_dtype = _autocast_dtype(precision)
    rank = _rank()
    kept_real: list[Tensor] = []
    kept_recon: list[Tensor] = []
    kept = 0
    was_training = tokenizer.training
    tokenizer.eval()
    bar = tqdm(total=total, unit="video", desc="reconstruct", disable=not progress or rank != 0, dynamic_ncols=True)
    try:
        for batch in loader:
            video = (batch["video"] if isinstance(batch, Mapping) else batch).to(device, non_blocking=True)
            keys = list(batch["key"]) if isinstance(batch, Mapping) and "key" in batch else None
            with _autocast(device, autocast_dtype):
                recon, ids = reconstruct_clips(tokenizer, video)
            metrics.update(video, recon.float(), ids, keys=keys)
            if rank == 0 and (grid_path is not None or strip_path is not None) and kept < grid_videos:
                take = grid_videos - kept
                kept_real.append(video[:take].float().cpu())
                kept_recon.append(quantize(recon[:take].float()).cpu())  # what the metrics saw
                kept += kept_real[-1].shape[0]
            bar.update(video.shape[0])
    finally:
        bar.close()
        tokenizer.train(was_training)
    result = metrics.compute()
    if kept_real:
        write_video_grid(torch.cat(kept_real), torch.cat(kept_recon), grid_path, strip_path, fps=grid_fps)
    return result


def write_video_grid(originals: Tensor, reconstructions: Tensor, mp4_path: str | os.PathLike | None,
                     png_path: str | os.PathLike | None, fps: float = 8.0) -> list[Path]:
    """`mp4_path`: a video whose frame t shows frame t of every clip, originals in the top row,
    reconstructions below; `png_path`: the frame strip, two rows per clip (its frames, then their
    reconstructions). Both use the training grids' layout (2 px white padding)."""
    from torchvision.utils import save_image

    from tokenizers_vis.data.video import clip_to_frames, write_video
    from tokenizers_vis.metrics.grids import reconstruction_grid

    written = []
    if mp4_path is not None:
        frames = torch.stack([reconstruction_grid(originals[:, t], reconstructions[:, t])
                              for t in range(originals.shape[1])])
        written.append(write_video(mp4_path, clip_to_frames(frames), fps))
    if png_path is not None:
        png_path = Path(png_path)
        png_path.parent.mkdir(parents=True, exist_ok=True)
        save_image(reconstruction_grid(originals, reconstructions), png_path)
        written.append(png_path)
    return written


# -- settings -----------------------------------------------------------------------------------
def _preset(cfg: Mapping, conf_dir: str | os.PathLike | None):
    data = str(cfg.get("data_source"))
    if conf_dir is None or os.sep in data or not (Path(conf_dir) / "data" / f"{data}.yaml").is_file():
        return None
    return _compose_data_preset(data, Path(conf_dir), cfg.get("paths"))


def is_video_config(cfg: Mapping, conf_dir: str | os.PathLike | None = None) -> bool:
    """Whether an eval config (conf/eval.yaml) asks for video: `frames` is set, `data` is a video
    preset (one with `frames`), or `data` is a folder of videos or video shards."""
    from tokenizers_vis.data.video import is_video_source

    if cfg.get("frames") is not None:
        return True
    preset = _preset(cfg, conf_dir)
    if preset is not None:
        return "frames" in preset
    return is_video_source(_plain(cfg.get("data_source")))


def video_clip_settings(cfg: Mapping, conf_dir: str | os.PathLike | None = None) -> tuple[int, float | None]:
    """(frames, fps) of the eval clips: the config's, else the video preset's, else 16 frames at
    each video's own rate (fps None)."""
    frames, fps = cfg.get("frames"), cfg.get("fps")
    preset = _preset(cfg, conf_dir) if frames is None or fps is None else None
    if preset is not None and "frames" in preset:
        frames = preset.frames if frames is None else frames
        fps = preset.get("fps") if fps is None else fps
    frames = DEFAULT_FRAMES if frames is None else int(frames)
    if frames < 1:
        raise ValueError(f"frames={frames}: a clip needs at least one frame")
    return frames, None if fps is None else float(fps)


def _plain(value: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _video_count(source: Any, max_videos: int | None, rank: int, world_size: int) -> int | None:
    from tokenizers_vis.data.video import list_video_files

    # The image count's rule, over video files.
    return expected_images(source, max_videos, rank, world_size, list_files=list_video_files)


def fvd_metric(frames: int, enabled: bool = True, i3d_weights: str | os.PathLike | None = None,
               strict: bool = False, notes: dict[str, str] | None = None) -> StreamingFVD | None:
    """The rFVD accumulator, or None (with a note under "rfvd" and a warning) when it is off, the
    clips are shorter than the I3D takes, or the weights are missing (`strict`: raise instead)."""
    notes = notes if notes is not None else {}
    if not enabled:
        return None
    if frames < I3D_MIN_FRAMES:
        notes["rfvd"] = (f"not computed (rfvd: null): the I3D needs clips of at least {I3D_MIN_FRAMES} frames, "
                         f"got {frames}")
        return None
    try:
        return StreamingFVD(weights_path=i3d_weights)
    except MissingWeightsError as err:
        if strict:
            raise
        notes["rfvd"] = f"not computed (rfvd: null): {err}"
        if _rank() == 0:
            log.warning("rFVD will not be computed (rfvd: null; strict_fvd=true makes this an error): %s", err)
    return None


# -- the command --------------------------------------------------------------------------------
def run_video_evaluation(cfg: Mapping, conf_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate `cfg.tokenizer` on the video clips of `cfg.data_source` (conf/eval.yaml), write
    `metrics.json`, `grid.mp4` and `frames.png` to `cfg.output_dir` (rank 0); returns the record.

    Raises MissingWeightsError when `strict_fid` / `strict_lpips` / `strict_fvd` is set and the
    weights are missing."""
    from tokenizers_vis.data import make_video_eval_loader
    from tokenizers_vis.models.loading import load_tokenizer

    processes = setup_processes(int(cfg.get("devices", 1)), str(cfg.get("accelerator", "auto")))
    try:
        start = time.perf_counter()
        tokenizer = load_tokenizer(str(cfg.tokenizer), use_ema=bool(cfg.get("use_ema", True))).to(processes.device)
        counts = token_counts(cfg.get("tokens"), tokenizer)
        if any(k != int(tokenizer.num_tokens) for k in counts):
            raise ValueError("tokens= with fewer tokens than the full count is measured on images only; "
                             "drop `tokens` for video data")
        frames, fps = video_clip_settings(cfg, conf_dir)
        factory, notes = metrics_factory_from_cfg(cfg, tokenizer.codebook_size)
        fvd = fvd_metric(frames, bool(cfg.get("fvd", True)), cfg.get("i3d_weights"),
                         bool(cfg.get("strict_fvd", False)), notes)
        metrics = VideoReconstructionMetrics(factory(), fvd)
        resolution = int(cfg.get("resolution") or tokenizer.image_size)
        source = resolve_data_source(str(cfg.data_source), conf_dir, cfg.get("paths"), processes)
        max_videos = cfg.get("max_images")
        batch_size = int(cfg.get("batch_size", 32))
        loader = make_video_eval_loader(
            source, resolution, batch_size, frames=frames, fps=fps,
            num_workers=int(cfg.get("num_workers", 0)),
            max_videos=None if max_videos is None else int(max_videos),
            rank=processes.rank, world_size=processes.world_size,
            interpolation=str(cfg.get("interpolation", "bicubic")),
        )
        output_dir = Path(str(cfg.output_dir))
        precision = str(cfg.get("precision", "32"))
        results = evaluate_video_reconstruction(
            tokenizer, loader, metrics, device=processes.device, precision=precision,
            grid_path=output_dir / VIDEO_GRID_FILE, strip_path=output_dir / FRAME_STRIP_FILE,
            grid_videos=int(cfg.get("grid_videos", 4)), grid_fps=fps or 8.0,
            progress=bool(cfg.get("progress", True)),
            total=_video_count(source, max_videos, processes.rank, processes.world_size),
        )
        skipped = all_reduce_sum(torch.tensor([loader.skip_counter.skipped], dtype=torch.int64)).item()
        per_video = results.pop("per_video")
        record = {
            **results,
            "tokenizer": str(cfg.tokenizer),
            "input": "whole clips" if getattr(tokenizer, "input_kind", "image") == "video" else "frame by frame",
            "data": str(cfg.data_source),
            "source": source,
            "resolution": resolution,
            "frames": frames,
            "fps": fps,
            "max_videos": max_videos,
            "batch_size": batch_size,
            "world_size": processes.world_size,
            "precision": precision,
            "skipped_samples": int(skipped),
            "seconds": round(time.perf_counter() - start, 2),
            "psnr_ssim": PSNR_SSIM_SETTINGS + "; video: per frame, averaged over each video's frames, then over videos",
            "temporal_error_settings": TEMPORAL_ERROR_SETTINGS,
            "rfvd_settings": f"I3D ({I3D_WEIGHTS_FILE}) logits of whole clips, float64 Fréchet statistics as rFID",
            "per_video": per_video,
        }
        record = json_ready(record, notes)
        record["notes"] = notes
        if processes.rank == 0:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / METRICS_FILE).write_text(json.dumps(record, indent=2) + "\n")
            written = [output_dir / METRICS_FILE, output_dir / VIDEO_GRID_FILE, output_dir / FRAME_STRIP_FILE]
            log.info("wrote %s:\n%s", ", ".join(map(str, written)),
                     json.dumps({k: record[k] for k in results}, indent=2))
        return record
    finally:
        processes.close()
