"""The shared accumulator: every metric on uint8-quantised images, None where unavailable."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from metrics_testing import TinyFeatureNet, degrade, natural_images
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from tokenizers_vis.metrics import (
    METRIC_KEYS,
    LPIPSMetric,
    MissingWeightsError,
    ReconstructionMetrics,
    StreamingFID,
    quantize,
    to_uint8,
)


@pytest.fixture(scope="module")
def full_metrics():
    """All metrics, with test stand-ins for the pretrained networks (LPIPS is slow to build)."""
    torch.manual_seed(0)
    return ReconstructionMetrics(codebook_size=8, fid=TinyFeatureNet(dim=8), lpips=True, lpips_random_backbone=True)


def test_every_metric_matches_its_reference(full_metrics):
    real = natural_images(10, 32, 40, seed=0)
    recon = degrade(real)
    ids = torch.tensor([[0, 1], [2, 3]]).repeat(5, 1)
    full_metrics.reset()
    for r, f, i in zip(real.split(4), recon.split(4), ids.split(4)):
        full_metrics.update(r, f, i)
    result = full_metrics.compute()
    assert tuple(result) == METRIC_KEYS and result["num_images"] == 10

    real_u8, recon_u8 = to_uint8(real), to_uint8(recon)
    pairs = [(r.permute(1, 2, 0).numpy(), f.permute(1, 2, 0).numpy()) for r, f in zip(real_u8, recon_u8)]
    psnr = np.mean([peak_signal_noise_ratio(r, f, data_range=255) for r, f in pairs])
    ssim = np.mean(
        [
            structural_similarity(
                r, f, channel_axis=-1, data_range=255, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
            )
            for r, f in pairs
        ]
    )
    assert result["psnr"] == pytest.approx(psnr, abs=1e-9)
    # The trivial baseline: each image painted its own (uint8-rounded) mean colour.
    flat = np.mean([peak_signal_noise_ratio(r, np.broadcast_to(r.mean(axis=(0, 1)).round(), r.shape), data_range=255)
                    for r, _ in pairs])
    assert result["psnr_flat_baseline"] == pytest.approx(flat, abs=1e-6) and result["psnr_flat_baseline"] < psnr
    assert result["ssim"] == pytest.approx(ssim, abs=1e-5)
    lpips = full_metrics.lpips(real_u8.float() / 255, recon_u8.float() / 255).mean().item()
    assert result["lpips"] == pytest.approx(lpips, rel=1e-5)
    fid = StreamingFID(full_metrics.fid.extractor)
    fid.update(real_u8, recon_u8)
    assert result["rfid"] == pytest.approx(fid.compute(), rel=1e-6)  # float32 features, other batching
    assert result["codebook_usage"] == pytest.approx(0.5)
    assert result["codebook_entropy"] == pytest.approx(2.0)
    assert result["codebook_perplexity"] == pytest.approx(4.0)


def test_perfect_reconstruction(full_metrics):
    real = quantize(natural_images(6, 32, 32, seed=1))
    full_metrics.reset()
    # Within half a grey level of the original: identical once quantised, as metrics see it.
    full_metrics.update(real, (real + 0.3 / 255).clamp(0, 1), torch.arange(6))
    result = full_metrics.compute()
    assert math.isinf(result["psnr"])
    assert result["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert result["lpips"] == pytest.approx(0.0, abs=1e-7)
    assert abs(result["rfid"]) < 1e-6
    assert result["codebook_usage"] == pytest.approx(6 / 8)


def test_video_counts_frames():
    metrics = ReconstructionMetrics(fid=False, lpips=False)
    video = natural_images(6, 24, 24, seed=2).reshape(2, 3, 3, 24, 24)
    metrics.update(video, degrade(video.flatten(0, 1)).reshape(video.shape))
    result = metrics.compute()
    assert result["num_images"] == 6 and result["psnr"] > 0


def test_unavailable_metrics_are_none():
    metrics = ReconstructionMetrics(codebook_size=None, fid=TinyFeatureNet(), lpips=False)
    assert metrics.compute() == {**dict.fromkeys(METRIC_KEYS), "num_images": 0}
    metrics.update(natural_images(1, 16, 16), natural_images(1, 16, 16, seed=1), torch.zeros(1, 4, dtype=torch.long))
    result = metrics.compute()
    assert result["rfid"] is None  # one image is not enough for a covariance
    assert result["lpips"] is None and result["codebook_usage"] is None and result["psnr"] is not None

    with_codebook = ReconstructionMetrics(codebook_size=4, fid=False, lpips=False)
    with_codebook.update(natural_images(2, 16, 16), natural_images(2, 16, 16, seed=1))
    assert with_codebook.compute()["codebook_entropy"] is None  # no ids were given


def test_missing_inception_weights_skip_rfid_with_a_warning(empty_hub_dir, caplog):
    with caplog.at_level(logging.WARNING):
        metrics = ReconstructionMetrics(fid=True, lpips=False)
    assert metrics.fid is None
    assert "pt_inception-2015-12-05-6726825d.pth" in caplog.text and "inception_weights=PATH" in caplog.text
    metrics.update(natural_images(2, 16, 16), natural_images(2, 16, 16, seed=1))
    result = metrics.compute()
    assert result["rfid"] is None and result["psnr"] is not None and result["ssim"] is not None


def test_strict_modes_raise_at_construction(empty_hub_dir):
    with pytest.raises(MissingWeightsError, match="inception_weights=PATH"):
        ReconstructionMetrics(fid=True, lpips=False, strict_fid=True)
    with pytest.raises(MissingWeightsError, match="lpips_weights=PATH"):
        ReconstructionMetrics(fid=False, lpips=True, strict_lpips=True)


def test_missing_lpips_weights_skip_lpips_with_a_warning(empty_hub_dir, caplog):
    with caplog.at_level(logging.WARNING):
        metrics = ReconstructionMetrics(fid=False, lpips=True)
    assert metrics.lpips is None and "vgg16-397923af.pth" in caplog.text


def test_rejects_mismatched_shapes():
    metrics = ReconstructionMetrics(fid=False, lpips=False)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.update(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 20))
