"""Video reconstruction metrics: everything `ReconstructionMetrics` measures on clips, plus rFVD,
a temporal-consistency error and per-video lists.

- psnr / ssim / lpips: per frame (both clips rounded to uint8), averaged over each video's
  frames, then over videos; also listed per video.
- rfid: every frame as an image (ReconstructionMetrics); rfvd: I3D features of whole clips.
- temporal_error: mean absolute difference between the frame-to-frame changes of the original
  and of the reconstruction, |(x[t+1] - x[t]) - (y[t+1] - y[t])| on [0, 1] over frames, channels
  and pixels, per video then averaged: 0 when the reconstruction moves exactly as the original,
  whatever its per-frame error; flicker and lost motion raise it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from tokenizers_vis.metrics.distributed import is_distributed
from tokenizers_vis.metrics.fvd import StreamingFVD
from tokenizers_vis.metrics.image import per_frame, psnr_per_image, ssim_per_image, to_uint8
from tokenizers_vis.metrics.reconstruction import ReconstructionMetrics

__all__ = ["VideoReconstructionMetrics", "temporal_error", "PER_VIDEO_KEYS"]

log = logging.getLogger(__name__)

PER_VIDEO_KEYS = ("psnr", "ssim", "lpips", "temporal_error")


def temporal_error(real: Tensor, recon: Tensor) -> Tensor:
    """(B,) mean |Δreal - Δrecon| over consecutive frames of (B, T, 3, H, W) clips in [0, 1];
    zeros for one-frame clips."""
    if real.shape[1] < 2:
        return torch.zeros(real.shape[0], dtype=torch.float64, device=real.device)
    d_real = real[:, 1:].double() - real[:, :-1].double()
    d_recon = recon[:, 1:].double() - recon[:, :-1].double()
    return (d_real - d_recon).abs().flatten(1).mean(dim=1)


class VideoReconstructionMetrics:
    """Accumulates clips (B, T, 3, H, W) in [0, 1] and their reconstructions.

    Args:
        base: the image-level accumulator (rFID over frames, codebook usage, counts); its LPIPS
            network, if any, is taken over here so LPIPS runs once per frame and is listed per video.
        fvd: a `StreamingFVD`, or None to leave rfvd out (reported as None).

    `compute()` (a collective under DDP) returns base's results (psnr/ssim/lpips over videos,
    rfid over frames, num_images = frames, num_videos) plus `rfvd`, `temporal_error` and
    `per_video`: {"key": [...], "psnr": [...], ...} over every rank's videos.
    """

    def __init__(self, base: ReconstructionMetrics, fvd: StreamingFVD | None = None):
        self.base = base
        self.lpips, base.lpips = base.lpips, None
        self.fvd = fvd
        self.reset()

    def to(self, device: torch.device | str) -> "VideoReconstructionMetrics":
        self.base.to(device)
        if self.lpips is not None:
            self.lpips.to(device)
        if self.fvd is not None:
            self.fvd.to(device)
        return self

    def reset(self) -> None:
        self.base.reset()
        if self.fvd is not None:
            self.fvd.reset()
        self.rows: list[dict[str, Any]] = []

    @torch.no_grad()
    def update(self, real: Tensor, recon: Tensor, ids: Tensor | None = None, keys: list[str] | None = None) -> None:
        if real.dim() != 5:
            raise ValueError(f"expected video (B, T, 3, H, W), got {tuple(real.shape)}")
        self.base.update(real, recon, ids)
        real_u8, recon_u8 = to_uint8(real), to_uint8(recon)
        real_q, recon_q = real_u8.float() / 255.0, recon_u8.float() / 255.0
        # The same per-frame functions as the base means (so the lists average to them).
        psnr = per_frame(psnr_per_image)(real_u8.double() / 255.0, recon_u8.double() / 255.0, data_range=1.0)
        ssim = per_frame(ssim_per_image)(real_q, recon_q, data_range=1.0)
        lpips = per_frame(self.lpips)(real_q, recon_q).double().mean(1) if self.lpips is not None else None
        temporal = temporal_error(real_q, recon_q)
        keys = keys if keys is not None else [None] * real.shape[0]
        for i in range(real.shape[0]):
            self.rows.append({
                "key": keys[i],
                "psnr": float(psnr[i].double().mean()),
                "ssim": float(ssim[i].double().mean()),
                "lpips": None if lpips is None else float(lpips[i]),
                "temporal_error": float(temporal[i]),
            })
        if self.fvd is not None:
            self.fvd.update(real_u8, recon_u8)

    def compute(self) -> dict[str, Any]:
        result: dict[str, Any] = self.base.compute()
        rows = _gather_rows(self.rows)
        n = len(rows)
        if self.lpips is not None and n:
            result["lpips"] = sum(r["lpips"] for r in rows) / n
        result["temporal_error"] = sum(r["temporal_error"] for r in rows) / n if n else None
        result["rfvd"] = None
        if self.fvd is not None:
            if n >= 2:
                result["rfvd"] = self.fvd.compute()
            else:
                log.warning("rFVD needs at least 2 videos, got %d", n)
        result["per_video"] = {name: [r[name] for r in rows] for name in ("key", *PER_VIDEO_KEYS)}
        return result


def _gather_rows(rows: list[dict]) -> list[dict]:
    """Every rank's rows; rank r's j-th video is the eval split's (j * world + r)-th, so they are
    interleaved back into the data order."""
    if not is_distributed():
        return list(rows)
    everyone: list[list[dict]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, rows)
    merged = []
    for j in range(max(len(r) for r in everyone)):
        merged.extend(r[j] for r in everyone if j < len(r))
    return merged
