"""One accumulator for every reconstruction metric, shared by the evaluator and the training
validation callback so both report numbers measured the same way.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor, nn

from tokenizers_vis.metrics.codebook import CodebookUsage
from tokenizers_vis.metrics.distributed import all_reduce_sum
from tokenizers_vis.metrics.fid import StreamingFID
from tokenizers_vis.metrics.image import per_frame, psnr_per_image, ssim_per_image, to_uint8
from tokenizers_vis.metrics.perceptual import LPIPSMetric
from tokenizers_vis.nn.weights import MissingWeightsError

__all__ = ["ReconstructionMetrics", "METRIC_KEYS", "VIDEO_KEYS"]

log = logging.getLogger(__name__)

METRIC_KEYS = (
    "psnr",
    "psnr_flat_baseline",
    "ssim",
    "lpips",
    "rfid",
    "codebook_usage",
    "codebook_entropy",
    "codebook_perplexity",
    "num_images",
)
# Added to the results of a stream of videos (after METRIC_KEYS); image results stay METRIC_KEYS.
VIDEO_KEYS = ("num_videos",)

# Layout of the float64 sums vector: one tensor, so combining ranks is a single all-reduce.
# _IMAGES counts images, or the frames of videos; _VIDEOS counts videos (0 for image batches).
_PSNR, _SSIM, _LPIPS, _IMAGES, _VIDEOS, _PSNR_FLAT = range(6)
_NUM_SUMS = 6

_psnr_per_frame = per_frame(psnr_per_image)
_ssim_per_frame = per_frame(ssim_per_image)


class ReconstructionMetrics:
    """PSNR, SSIM, LPIPS, rFID and codebook usage over a stream of (original, reconstruction).

    Both images are quantised to uint8 (round, clamp) before any metric, as the standard asks;
    PSNR/SSIM/LPIPS are means over images of per-image values. ``psnr_flat_baseline`` is the PSNR of
    the trivial reconstruction that paints each image (frame) its own mean colour: a model must beat
    it to have learned more than the average colour. Video batches (B, T, 3, H, W)
    are measured frame by frame: PSNR/SSIM/LPIPS are averaged over each video's frames, then
    over videos (each video counts once, whatever its length); rFID takes every frame as an
    image. ``num_images`` counts the images measured (for video, the frames), and video results
    add ``num_videos``. A stream holds images or videos, not both, until ``reset()``.

    Distributed: ``compute()`` sums all state over ranks (every rank must call it), so with
    disjoint shards each image counts once.

    Args:
        codebook_size: track code usage for ids in [0, codebook_size); None for continuous models
            (ids passed to update are then ignored).
        fid: True for TF-FID Inception, False to skip, or a feature extractor module (tests).
        lpips: compute LPIPS-VGG.
        inception_weights, lpips_weights: weight files (or folders); None looks in the torch hub cache.
        download: fetch weights missing from the torch hub cache (off as well under HF_HUB_OFFLINE).
        lpips_random_backbone: random VGG trunk (tests only; values are meaningless).
        strict_fid, strict_lpips: raise MissingWeightsError at construction instead of
            reporting None with a warning when the weights are missing.
    """

    def __init__(
        self,
        codebook_size: int | None = None,
        fid: bool | nn.Module = True,
        lpips: bool = True,
        inception_weights: str | os.PathLike | None = None,
        lpips_weights: str | os.PathLike | None = None,
        lpips_random_backbone: bool = False,
        strict_fid: bool = False,
        strict_lpips: bool = False,
        download: bool = True,
    ):
        self.fid: StreamingFID | None = None
        if isinstance(fid, nn.Module):
            self.fid = StreamingFID(feature_extractor=fid)
        elif fid:
            try:
                self.fid = StreamingFID(weights_path=inception_weights, download=download)
            except MissingWeightsError as err:
                if strict_fid:
                    raise
                log.warning("rFID will not be computed: %s", err)

        self.lpips: LPIPSMetric | None = None
        if lpips:
            try:
                self.lpips = LPIPSMetric(lpips_weights, random_backbone=lpips_random_backbone, download=download)
            except MissingWeightsError as err:
                if strict_lpips:
                    raise
                log.warning("LPIPS will not be computed: %s", err)

        self.codebook = CodebookUsage(codebook_size) if codebook_size else None
        self.reset()

    def to(self, device: torch.device | str) -> "ReconstructionMetrics":
        """Move the feature networks (state follows the inputs' device on the next update)."""
        if self.fid is not None:
            self.fid.to(device)
        if self.lpips is not None:
            self.lpips.to(device)
        return self

    def reset(self) -> None:
        self._sums = torch.zeros(_NUM_SUMS, dtype=torch.float64)
        self._kind: str | None = None  # "image" or "video" once a batch came
        if self.fid is not None:
            self.fid.reset()
        if self.codebook is not None:
            self.codebook.reset()

    @torch.no_grad()
    def update(self, real: Tensor, recon: Tensor, ids: Tensor | None = None) -> None:
        """Add a batch: ``real`` and ``recon`` float in [0, 1], images (B, 3, H, W) or videos
        (B, T, 3, H, W); ``ids`` the batch's token ids (any shape) for codebook usage."""
        kind = _check_batch(real, recon)
        if self._kind not in (None, kind):
            raise ValueError(f"this stream holds {self._kind}s, got a batch of {kind}s, shape {tuple(real.shape)}; "
                             "measure images and videos with separate ReconstructionMetrics (or reset() first)")

        real_u8, recon_u8 = to_uint8(real), to_uint8(recon)
        real_q, recon_q = real_u8.float() / 255.0, recon_u8.float() / 255.0
        video = kind == "video"
        batch = torch.zeros(_NUM_SUMS, dtype=torch.float64, device=real.device)
        # k / 255 in float64, so PSNR equals scikit-image on the uint8 images to rounding error.
        psnr = _psnr_per_frame(real_u8.double() / 255.0, recon_u8.double() / 255.0, data_range=1.0)
        batch[_PSNR] = _per_item(psnr, video).sum()
        flat = to_uint8(real_q.mean(dim=(-2, -1), keepdim=True).expand_as(real_q)).double() / 255.0
        batch[_PSNR_FLAT] = _per_item(_psnr_per_frame(real_u8.double() / 255.0, flat, data_range=1.0), video).sum()
        batch[_SSIM] = _per_item(_ssim_per_frame(real_q, recon_q, data_range=1.0), video).sum()
        if self.lpips is not None:
            batch[_LPIPS] = _per_item(per_frame(self.lpips)(real_q, recon_q), video).sum().to(real.device)
        batch[_IMAGES] = real.shape[0] * real.shape[1] if video else real.shape[0]
        batch[_VIDEOS] = real.shape[0] if video else 0
        if self._sums.device != batch.device:
            self._sums = self._sums.to(batch.device)
        self._sums += batch
        self._kind = kind

        if self.fid is not None:
            if video:  # rFID over frames: every frame is one sample of the image statistics
                real_u8, recon_u8 = real_u8.flatten(0, 1), recon_u8.flatten(0, 1)
            self.fid.update(real_u8, recon_u8)
        if ids is not None and self.codebook is not None:
            self.codebook.update(ids)

    def compute(self) -> dict[str, float | int | None]:
        """All metrics over all ranks; None for those not computed (see ``METRIC_KEYS``; a stream
        of videos adds ``VIDEO_KEYS``).

        ``psnr`` is ``inf`` if every image is reconstructed exactly; ``codebook_entropy`` is in bits.
        """
        sums = all_reduce_sum(self._sums).tolist()
        num_images, num_videos = int(sums[_IMAGES]), int(sums[_VIDEOS])
        n = num_videos or num_images  # what the PSNR/SSIM/LPIPS means are over
        result: dict[str, float | int | None] = dict.fromkeys(METRIC_KEYS)
        result["num_images"] = num_images
        if num_videos:
            result["num_videos"] = num_videos
        if n > 0:
            result["psnr"] = sums[_PSNR] / n
            result["psnr_flat_baseline"] = sums[_PSNR_FLAT] / n
            result["ssim"] = sums[_SSIM] / n
            if self.lpips is not None:
                result["lpips"] = sums[_LPIPS] / n
        if self.fid is not None:
            # The counts are the same on every rank, so all ranks agree on running the collective.
            if num_images >= 2:
                result["rfid"] = self.fid.compute()
            else:
                log.warning("rFID needs at least 2 images, got %d", num_images)
        if self.codebook is not None:
            stats = self.codebook.compute()
            if stats["total"] > 0:
                result["codebook_usage"] = stats["usage"]
                result["codebook_entropy"] = stats["entropy_bits"]
                result["codebook_perplexity"] = stats["perplexity"]
        return result


def _per_item(values: Tensor, video: bool) -> Tensor:
    """Per-image values (B,) as they are; per-frame values (B, T) -> per-video means (B,)."""
    return values.double().mean(dim=1) if video else values.double()


def _check_batch(real: Tensor, recon: Tensor) -> str:
    """"image" for (B, 3, H, W) batches, "video" for (B, T, 3, H, W); a ValueError naming the
    expected layouts otherwise."""
    if real.shape != recon.shape:
        raise ValueError(f"originals {tuple(real.shape)} and reconstructions {tuple(recon.shape)} differ in shape")
    if real.dim() == 4:
        return "image"
    if real.dim() == 5 and real.shape[1] > 0 and real.shape[2] == 3:
        return "video"
    hint = ""
    if real.dim() == 5 and real.shape[1] == 3:
        hint = "; channels-first video (B, 3, T, H, W) needs x.transpose(1, 2)"
    raise ValueError(f"expected images (B, 3, H, W) or videos (B, T, 3, H, W) with T >= 1, got shape "
                     f"{tuple(real.shape)}{hint}")
