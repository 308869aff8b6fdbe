"""Video batches (B, T, 3, H, W) in the shared accumulator: per-frame PSNR/SSIM/LPIPS averaged
per video then over videos, rFID over frames, frames and videos counted apart."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from metrics_testing import TinyFeatureNet, degrade, natural_images

from tokenizers_vis.metrics import (
    METRIC_KEYS,
    ReconstructionMetrics,
    StreamingFID,
    psnr_per_image,
    ssim_per_image,
    to_uint8,
)
from tokenizers_vis.metrics.reconstruction import VIDEO_KEYS

SIZE = 24  # SSIM needs at least 11 px per side


@pytest.fixture(scope="module")
def metrics():
    """All metrics, with test stand-ins for the pretrained networks (LPIPS is slow to build)."""
    torch.manual_seed(0)
    return ReconstructionMetrics(codebook_size=8, fid=TinyFeatureNet(dim=8), lpips=True, lpips_random_backbone=True)


def _videos(b: int, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    real = natural_images(b * t, SIZE, SIZE, seed=seed)
    return real.reshape(b, t, 3, SIZE, SIZE), degrade(real, seed=seed + 1).reshape(b, t, 3, SIZE, SIZE)


def _by_hand(metrics: ReconstructionMetrics, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """The video metrics from the image metrics on each video's frames: per-frame values, mean
    over the frames of each video, mean over videos; rFID on all frames as images."""
    psnr, ssim, lpips, real_frames, recon_frames = [], [], [], [], []
    for real, recon in batches:
        for video_real, video_recon in zip(to_uint8(real), to_uint8(recon)):  # (T, 3, H, W) uint8
            r, f = video_real.double() / 255, video_recon.double() / 255
            psnr.append(psnr_per_image(r, f).mean().item())
            ssim.append(ssim_per_image(r.float(), f.float()).double().mean().item())
            lpips.append(metrics.lpips(r.float(), f.float()).double().mean().item())
            real_frames.append(video_real)
            recon_frames.append(video_recon)
    fid = StreamingFID(feature_extractor=metrics.fid.extractor)
    fid.update(torch.cat(real_frames), torch.cat(recon_frames))
    mean = statistics.fmean
    return {"psnr": mean(psnr), "ssim": mean(ssim), "lpips": mean(lpips), "rfid": fid.compute()}


def test_video_metrics_are_the_image_metrics_of_the_frames(metrics):
    # Two batches of different lengths: each video counts once in the means, whatever its length.
    batches = [_videos(2, 3, seed=0), _videos(3, 1, seed=10), _videos(1, 5, seed=20)]
    metrics.reset()
    for i, (real, recon) in enumerate(batches):
        metrics.update(real, recon, torch.full((real.shape[0], 2), i, dtype=torch.long))
    result = metrics.compute()
    assert tuple(result) == METRIC_KEYS + VIDEO_KEYS
    assert result["num_images"] == 2 * 3 + 3 * 1 + 1 * 5  # frames
    assert result["num_videos"] == 6
    expected = _by_hand(metrics, batches)
    assert result["psnr"] == pytest.approx(expected["psnr"], abs=1e-9)
    assert result["ssim"] == pytest.approx(expected["ssim"], abs=1e-6)
    assert result["lpips"] == pytest.approx(expected["lpips"], rel=1e-5)
    assert result["rfid"] == pytest.approx(expected["rfid"], rel=1e-6)
    assert result["codebook_usage"] == pytest.approx(3 / 8)
    # Not the frame-weighted mean: the one 5-frame video would weigh 5 times as much.
    frame_mean = sum(psnr_per_image(to_uint8(r).flatten(0, 1).double() / 255, to_uint8(f).flatten(0, 1).double() / 255)
                     .sum().item() for r, f in batches) / result["num_images"]
    assert not math.isclose(result["psnr"], frame_mean, abs_tol=1e-6)


def test_one_frame_videos_measure_as_images(metrics):
    real, recon = natural_images(6, SIZE, SIZE, seed=3), degrade(natural_images(6, SIZE, SIZE, seed=3))
    ids = torch.arange(12).reshape(6, 2) % 8
    measured = {}
    for kind, (r, f) in {"image": (real, recon), "video": (real[:, None], recon[:, None])}.items():
        metrics.reset()
        for chunk in range(0, 6, 4):
            metrics.update(r[chunk:chunk + 4], f[chunk:chunk + 4], ids[chunk:chunk + 4])
        measured[kind] = metrics.compute()
    images, videos = measured["image"], measured["video"]
    assert tuple(images) == METRIC_KEYS  # images report exactly what they did before video
    assert tuple(videos) == METRIC_KEYS + VIDEO_KEYS and videos["num_videos"] == 6
    for key in METRIC_KEYS:
        assert videos[key] == pytest.approx(images[key], rel=1e-12, abs=1e-12), key


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((2, 3, 4, SIZE, SIZE), r"\(B, T, 3, H, W\).*transpose\(1, 2\)"),  # channels-first video
        ((2, 4, 1, SIZE, SIZE), r"videos \(B, T, 3, H, W\)"),  # grey frames
        ((2, 0, 3, SIZE, SIZE), r"T >= 1"),  # no frames
        ((3, SIZE, SIZE), r"images \(B, 3, H, W\) or videos"),
        ((1, 2, 2, 3, SIZE, SIZE), r"images \(B, 3, H, W\) or videos"),
    ],
)
def test_wrong_shapes_are_refused_with_the_expected_layouts(shape, match):
    metrics = ReconstructionMetrics(fid=False, lpips=False)
    with pytest.raises(ValueError, match=match):
        metrics.update(torch.rand(shape), torch.rand(shape))
    assert metrics.compute()["num_images"] == 0  # nothing was added


def test_videos_and_reconstructions_must_match_and_streams_do_not_mix():
    metrics = ReconstructionMetrics(fid=False, lpips=False)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.update(torch.rand(2, 3, 3, SIZE, SIZE), torch.rand(2, 4, 3, SIZE, SIZE))
    video = torch.rand(2, 3, 3, SIZE, SIZE)
    metrics.update(video, video)
    with pytest.raises(ValueError, match="holds videos, got a batch of images"):
        metrics.update(video[:, 0], video[:, 0])
    metrics.reset()
    metrics.update(video[:, 0], video[:, 0])  # a fresh stream takes images
    assert metrics.compute()["num_images"] == 2
