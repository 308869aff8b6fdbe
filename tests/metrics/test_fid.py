"""Fréchet distance, streaming float64 statistics and FID against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from metrics_testing import TinyFeatureNet, degrade, natural_images

from tokenizers_vis.metrics import FeatureStats, StreamingFID, frechet_distance, to_uint8


def reference_frechet(mu1, cov1, mu2, cov2) -> float:
    """Independent float64 Fréchet distance: Tr sqrt(C1 C2) = Tr sqrt(C1^1/2 C2 C1^1/2), a
    symmetric PSD matrix, via eigendecompositions only (no scipy.linalg.sqrtm)."""
    w, v = np.linalg.eigh(cov1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ cov2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def random_gaussian(rng: np.random.Generator, dim: int):
    a = rng.normal(size=(dim, dim))
    return rng.normal(size=dim), a @ a.T / dim + 0.1 * np.eye(dim)


def test_frechet_distance_matches_independent_reference():
    rng = np.random.default_rng(0)
    for dim in (1, 8, 64):
        mu1, cov1 = random_gaussian(rng, dim)
        mu2, cov2 = random_gaussian(rng, dim)
        ours = frechet_distance(mu1, cov1, mu2, cov2)
        assert ours == pytest.approx(reference_frechet(mu1, cov1, mu2, cov2), rel=1e-9, abs=1e-9)


def test_frechet_distance_accepts_tensors_and_is_zero_for_equal_gaussians():
    rng = np.random.default_rng(1)
    mu, cov = random_gaussian(rng, 16)
    assert frechet_distance(torch.from_numpy(mu), torch.from_numpy(cov), mu, cov) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_with_singular_covariances():
    # Fewer samples than dimensions: both covariances are rank-deficient.
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(10, 32)), rng.normal(size=(12, 32)) + 0.3
    mu1, cov1, mu2, cov2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    ours = frechet_distance(mu1, cov1, mu2, cov2)
    assert np.isfinite(ours)
    assert ours == pytest.approx(reference_frechet(mu1, cov1, mu2, cov2), rel=1e-6)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_in_chunks_equal_one_shot_numpy():
    rng = np.random.default_rng(3)
    # Offset mean and float32 storage: the float64 accumulation must still match numpy.
    features = (rng.normal(size=(100, 12)) * 3 + 10).astype(np.float32)
    stats = FeatureStats()
    start = 0
    for size in (1, 7, 30, 62):
        stats.update(torch.from_numpy(features[start : start + size]))
        start += size
    assert stats.n == 100 and stats.sum.dtype == torch.float64
    f64 = features.astype(np.float64)
    np.testing.assert_allclose(stats.mean().numpy(), f64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov().numpy(), np.cov(f64, rowvar=False), rtol=1e-9, atol=1e-10)


def test_feature_stats_merge_and_state_dict_round_trip():
    features = torch.randn(50, 6, generator=torch.Generator().manual_seed(4))
    whole = FeatureStats().update(features)
    left, right = FeatureStats().update(features[:20]), FeatureStats(dim=6).update(features[20:])
    merged = FeatureStats().merge(left).merge(right)
    torch.testing.assert_close(merged.mean(), whole.mean())
    torch.testing.assert_close(merged.cov(), whole.cov())
    restored = FeatureStats.from_state_dict(merged.state_dict())
    assert restored.n == 50
    torch.testing.assert_close(restored.cov(), whole.cov())
    # Without a process group all_reduce is a copy, and leaves the original untouched.
    reduced = merged.all_reduce()
    assert reduced.n == 50 and reduced is not merged
    torch.testing.assert_close(reduced.outer, merged.outer)


def test_feature_stats_needs_two_samples_for_covariance():
    stats = FeatureStats().update(torch.ones(1, 3))
    with pytest.raises(ValueError, match="at least 2"):
        stats.cov()


def test_fid_of_a_set_against_itself_is_zero():
    fid = StreamingFID(feature_extractor=TinyFeatureNet(dim=16))
    images = natural_images(64, 32, 32, seed=5)
    for batch in images.split(20):
        fid.update(batch, batch)
    assert abs(fid.compute()) < 1e-6


def test_fid_accepts_float_and_uint8_alike_and_matches_reference():
    net = TinyFeatureNet(dim=16)
    real, fake = natural_images(48, 32, 32, seed=6), degrade(natural_images(48, 32, 32, seed=6))
    from_float, from_uint8 = StreamingFID(net), StreamingFID(net)
    from_float.update(real, fake)
    from_uint8.update(to_uint8(real), to_uint8(fake))
    value = from_float.compute()
    assert value == from_uint8.compute() and value > 0

    with torch.no_grad():
        fr = net(to_uint8(real)).double().numpy()
        ff = net(to_uint8(fake)).double().numpy()
    expected = reference_frechet(fr.mean(0), np.cov(fr, rowvar=False), ff.mean(0), np.cov(ff, rowvar=False))
    assert value == pytest.approx(expected, rel=1e-6)


def test_fid_equals_torchmetrics_with_the_same_feature_network():
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = TinyFeatureNet(dim=16)
    real, fake = natural_images(64, 32, 32, seed=7), degrade(natural_images(64, 32, 32, seed=7), noise=0.2)
    ours = StreamingFID(net)
    theirs = FrechetInceptionDistance(feature=net, input_img_size=(3, 32, 32))
    for r, f in zip(real.split(16), fake.split(16)):
        ours.update(r, f)
        theirs.update(to_uint8(r), real=True)
        theirs.update(to_uint8(f), real=False)
    assert ours.compute() == pytest.approx(float(theirs.compute()), rel=1e-3)


def test_fid_needs_two_images_per_side_and_resets():
    fid = StreamingFID(TinyFeatureNet())
    fid.update(natural_images(1, 16, 16), natural_images(1, 16, 16, seed=1))
    with pytest.raises(ValueError, match="at least 2"):
        fid.compute()
    fid.reset()
    assert fid.real.n == 0 and fid.fake.n == 0
