"""rFVD through the I3D loading path (a tiny random TorchScript 3D network saved here), checked
against a hand computation of the Fréchet distance, and the per-video metrics around it checked
against scikit-image frame by frame."""

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import nn

from tokenizers_vis.metrics import (
    I3D_WEIGHTS_FILE,
    I3DFeatures,
    MissingWeightsError,
    ReconstructionMetrics,
    StreamingFVD,
    VideoReconstructionMetrics,
    temporal_error,
)

from fvd_testing import save_tiny_i3d  # noqa: E402  (tests/metrics is on sys.path: conftest.py)

# The released I3D is TorchScript, so the tests script one; torch marks TorchScript as deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")


@pytest.fixture
def tiny_i3d(tmp_path) -> Path:
    return save_tiny_i3d(tmp_path / "i3d")


def clips(seed: int, n: int = 6, t: int = 9, size: int = 224) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, t, 3, 4, 4, generator=g)
    return nn.functional.interpolate(coarse.flatten(0, 1), size=(size, size), mode="bilinear").reshape(
        n, t, 3, size, size)


def test_rfvd_equals_a_hand_frechet_distance_on_the_same_features(tiny_i3d):
    real, fake = clips(0, size=64), 0.5 * clips(0, size=64) + 0.5 * clips(1, size=64)
    # A folder holding i3d_torchscript.pt; 64 px inputs (the standard is 224) keep the test fast.
    fvd = StreamingFVD(I3DFeatures(tiny_i3d.parent, resolution=64))
    for i in range(0, 6, 4):  # two batches: statistics stream
        fvd.update(real[i:i + 4], fake[i:i + 4])
    # By hand: the scripted net on [-1, 1] clips laid out (B, 3, T, H, W) (already 64 px: no resize).
    net = torch.jit.load(str(tiny_i3d))

    def features(video):
        u8 = (video * 255).round().clamp(0, 255) / 255.0
        with torch.no_grad():
            out = net((u8 * 2 - 1).transpose(1, 2), rescale=False, resize=False, return_features=True)
        return out.double().numpy()

    f_real, f_fake = features(real), features(fake)
    mu1, mu2 = f_real.mean(0), f_fake.mean(0)
    c1, c2 = np.cov(f_real, rowvar=False), np.cov(f_fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean))
    assert expected > 0.01  # far from zero: the check below is not trivially met
    assert fvd.compute() == pytest.approx(expected, rel=1e-6)
    fvd.reset()
    fvd.update(real, real)
    assert abs(fvd.compute()) < 1e-6


def test_i3d_input_is_short_side_resized_and_centre_cropped(tiny_i3d):
    extractor = I3DFeatures(tiny_i3d, resolution=32)
    video = clips(2, n=2, size=32)
    wide = torch.cat([torch.zeros(2, 9, 3, 32, 16), video, torch.ones(2, 9, 3, 32, 16)], dim=-1)
    assert torch.allclose(extractor(wide), extractor(video), atol=1e-5)  # the crop drops the side bands
    assert torch.allclose(extractor(nn.functional.interpolate(video.flatten(0, 1), scale_factor=2.0,
                                                              mode="nearest").reshape(2, 9, 3, 64, 64)),
                          extractor(video), atol=0.2)
    with pytest.raises(ValueError, match="at least 9 frames"):
        extractor(video[:, :8])


def test_missing_or_unreadable_i3d_weights_say_what_to_do(tmp_path, empty_hub_dir):
    with pytest.raises(MissingWeightsError, match="i3d_torchscript.pt.*i3d_weights=PATH"):
        I3DFeatures()
    with pytest.raises(MissingWeightsError, match="i3d_weights="):
        StreamingFVD(weights_path=tmp_path / "nowhere.pt")
    junk = tmp_path / I3D_WEIGHTS_FILE
    junk.write_bytes(b"not a torchscript archive")
    with pytest.raises(MissingWeightsError, match="not a TorchScript archive"):
        I3DFeatures(junk)


def test_per_video_psnr_ssim_equal_scikit_image_frame_by_frame(tiny_i3d):
    g = torch.Generator().manual_seed(3)
    real = torch.rand(3, 4, 3, 24, 24, generator=g)
    recon = (real + 0.08 * torch.randn(real.shape, generator=g)).clamp(0, 1)
    metrics = VideoReconstructionMetrics(ReconstructionMetrics(None, fid=False, lpips=False))
    metrics.update(real[:2], recon[:2], keys=["a", "b"])
    metrics.update(real[2:], recon[2:], keys=["c"])
    result = metrics.compute()
    rows = result["per_video"]
    assert rows["key"] == ["a", "b", "c"] and result["num_videos"] == 3 and result["num_images"] == 12
    r8 = (real * 255).round().byte().permute(0, 1, 3, 4, 2).numpy()
    c8 = (recon * 255).round().byte().permute(0, 1, 3, 4, 2).numpy()
    for v in range(3):
        psnr = [peak_signal_noise_ratio(r8[v, t], c8[v, t], data_range=255) for t in range(4)]
        ssim = [structural_similarity(r8[v, t], c8[v, t], data_range=255, channel_axis=-1, gaussian_weights=True,
                                      sigma=1.5, use_sample_covariance=False) for t in range(4)]
        assert rows["psnr"][v] == pytest.approx(np.mean(psnr), abs=1e-6)
        assert rows["ssim"][v] == pytest.approx(np.mean(ssim), abs=1e-5)
        hand = np.abs(np.diff(r8[v].astype(np.float64) / 255, axis=0) - np.diff(c8[v].astype(np.float64) / 255,
                                                                               axis=0)).mean()
        assert rows["temporal_error"][v] == pytest.approx(hand, abs=1e-9)
    assert result["psnr"] == pytest.approx(np.mean(rows["psnr"]), abs=1e-9)  # the means are over videos
    assert result["ssim"] == pytest.approx(np.mean(rows["ssim"]), abs=1e-9)
    assert result["temporal_error"] == pytest.approx(np.mean(rows["temporal_error"]), abs=1e-12)
    assert result["rfvd"] is None and rows["lpips"] == [None, None, None]


def test_temporal_error_sees_motion_not_a_constant_offset():
    video = clips(4, n=2, t=5, size=16)
    assert torch.allclose(temporal_error(video, (video + 0.1).clamp(max=2)), torch.zeros(2, dtype=torch.float64),
                          atol=1e-6)
    frozen = video[:, :1].expand_as(video)  # a reconstruction that never moves
    assert (temporal_error(video, frozen) > 0.01).all()
    assert torch.equal(temporal_error(video[:, :1], frozen[:, :1]), torch.zeros(2, dtype=torch.float64))


def test_video_metrics_with_fvd_report_rfvd(tiny_i3d):
    real = clips(5, n=4, t=9, size=32)
    metrics = VideoReconstructionMetrics(ReconstructionMetrics(None, fid=False, lpips=False),
                                         StreamingFVD(weights_path=tiny_i3d))
    metrics.update(real, (real * 0.9).clamp(0, 1))
    result = metrics.compute()
    assert result["rfvd"] is not None and result["rfvd"] > 0
