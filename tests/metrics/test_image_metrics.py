"""Quantisation, PSNR and SSIM against hand-computed values and scikit-image; the video wrapper."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from metrics_testing import degrade, natural_images
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from tokenizers_vis.metrics import per_frame, psnr_per_image, quantize, ssim_per_image, to_uint8


def as_hwc_uint8(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-0.2, 0.0, 0.4 / 255, 0.6 / 255, 0.5, 254.6 / 255, 1.0, 1.3]).reshape(1, 1, 1, -1)
    assert to_uint8(x).flatten().tolist() == [0, 0, 0, 1, 128, 255, 255, 255]
    u8 = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert to_uint8(u8) is u8
    assert torch.equal(to_uint8(quantize(u8.float() / 255)), u8)


def test_psnr_known_value_for_a_constant_offset():
    x = torch.full((2, 3, 8, 8), 0.5)
    y = x + 10 / 255
    expected = 20 * math.log10(255 / 10)  # MSE = (10/255)^2 on data_range 1
    torch.testing.assert_close(psnr_per_image(x, y), torch.full((2,), expected, dtype=torch.float64))
    # The same pair on the 0..255 scale.
    torch.testing.assert_close(psnr_per_image(x * 255, y * 255, data_range=255.0), torch.full((2,), expected, dtype=torch.float64))
    assert torch.isinf(psnr_per_image(x, x)).all()


def test_psnr_per_image_mean_matches_skimage_on_uint8():
    real_u8 = to_uint8(natural_images(6, 40, 56, seed=0))
    recon_u8 = to_uint8(degrade(natural_images(6, 40, 56, seed=0)))
    reference = np.mean(
        [peak_signal_noise_ratio(as_hwc_uint8(r), as_hwc_uint8(f), data_range=255) for r, f in zip(real_u8, recon_u8)]
    )
    from_float32 = psnr_per_image(real_u8.float() / 255, recon_u8.float() / 255).mean().item()
    assert abs(from_float32 - reference) < 1e-5  # float32 rounding of k/255 only
    from_float64 = psnr_per_image(real_u8.double() / 255, recon_u8.double() / 255).mean().item()
    assert from_float64 == pytest.approx(reference, abs=1e-9)


def test_ssim_matches_skimage_including_borders():
    # Non-square, not a multiple of the window: border handling shows up if it differs.
    real_u8 = to_uint8(natural_images(6, 40, 57, seed=1))
    recon_u8 = to_uint8(degrade(natural_images(6, 40, 57, seed=1), noise=0.1))
    ours = ssim_per_image(real_u8.float() / 255, recon_u8.float() / 255)
    reference = torch.tensor(
        [
            structural_similarity(
                as_hwc_uint8(r),
                as_hwc_uint8(f),
                channel_axis=-1,
                data_range=255,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
            )
            for r, f in zip(real_u8, recon_u8)
        ],
        dtype=torch.float64,
    )
    assert (ours.double() - reference).abs().max() < 1e-4
    # In float64 the agreement is to rounding error.
    ours64 = ssim_per_image(real_u8.double() / 255, recon_u8.double() / 255)
    torch.testing.assert_close(ours64, reference, rtol=0, atol=1e-10)


def test_ssim_of_an_image_with_itself_is_one():
    x = quantize(natural_images(3, 32, 32, seed=2))
    torch.testing.assert_close(ssim_per_image(x, x), torch.ones(3), rtol=0, atol=1e-5)


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="at least 11"):
        ssim_per_image(torch.rand(1, 3, 8, 32), torch.rand(1, 3, 8, 32))


def test_per_frame_applies_a_metric_to_every_frame():
    video = natural_images(6, 24, 24, seed=3).reshape(2, 3, 3, 24, 24)
    recon = degrade(video.flatten(0, 1)).reshape(video.shape)
    for metric in (psnr_per_image, ssim_per_image):
        per_video = per_frame(metric)(video, recon)
        assert per_video.shape == (2, 3)
        torch.testing.assert_close(per_video.flatten(), metric(video.flatten(0, 1), recon.flatten(0, 1)))
    images = video[0]
    torch.testing.assert_close(per_frame(psnr_per_image)(images, recon[0]), psnr_per_image(images, recon[0]))


def test_image_metrics_reject_video_and_mismatched_shapes():
    with pytest.raises(ValueError, match="per_frame"):
        psnr_per_image(torch.rand(1, 2, 3, 16, 16), torch.rand(1, 2, 3, 16, 16))
    with pytest.raises(ValueError, match="differ in shape"):
        ssim_per_image(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 17))
